//! Message authentication: a shared secret per run, and an HMAC-SHA256 tag over every frame.
//!
//! A signed message declares `"auth": "hmac-sha256"` in its header and carries one more frame,
//! last: the 32-byte tag of `HMAC-SHA256(secret, for each other frame: u64 LE length || bytes)`.
//! A receiver that holds the secret refuses any message without a valid tag before parsing
//! anything else, so a stranger's bytes never reach the JSON parser or the tensor decoder.

use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::Path;

/// The value of the header's `auth` field on signed messages.
pub const AUTH_SCHEME: &str = "hmac-sha256";
/// Tag length in bytes.
pub const TAG_BYTES: usize = 32;

/// A run's shared secret.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A key from secret bytes (at least 16).
    pub fn new(secret: &[u8]) -> Result<Self, String> {
        if secret.len() < 16 {
            return Err(format!(
                "a secret needs at least 16 bytes, got {}",
                secret.len()
            ));
        }
        Ok(Key(secret.to_vec()))
    }

    /// The secret of a config: the file `secret_file` names (surrounding whitespace trimmed), or
    /// else the `RHO_SECRET` environment variable; `None` when neither is set.
    pub fn from_config(secret_file: Option<&Path>) -> Result<Option<Self>, String> {
        if let Some(path) = secret_file {
            let bytes =
                std::fs::read(path).map_err(|e| format!("secret file {}: {e}", path.display()))?;
            let text = String::from_utf8_lossy(&bytes);
            return Key::new(text.trim().as_bytes())
                .map(Some)
                .map_err(|e| format!("secret file {}: {e}", path.display()));
        }
        match std::env::var("RHO_SECRET") {
            Ok(s) if !s.is_empty() => Key::new(s.trim().as_bytes())
                .map(Some)
                .map_err(|e| format!("RHO_SECRET: {e}")),
            _ => Ok(None),
        }
    }

    /// The tag of `frames`.
    pub fn tag(&self, frames: &[Bytes]) -> [u8; TAG_BYTES] {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        for f in frames {
            mac.update(&(f.len() as u64).to_le_bytes());
            mac.update(f);
        }
        mac.finalize().into_bytes().into()
    }

    /// Whether `tag` is the tag of `frames` (compared in constant time).
    pub fn verify(&self, frames: &[Bytes], tag: &[u8]) -> bool {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        for f in frames {
            mac.update(&(f.len() as u64).to_le_bytes());
            mac.update(f);
        }
        mac.verify_slice(tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_cover_frame_boundaries() {
        let k = Key::new(b"0123456789abcdef").unwrap();
        let a = [Bytes::from_static(b"ab"), Bytes::from_static(b"c")];
        let b = [Bytes::from_static(b"a"), Bytes::from_static(b"bc")];
        assert_ne!(k.tag(&a), k.tag(&b));
        assert!(k.verify(&a, &k.tag(&a)));
        assert!(!k.verify(&a, &k.tag(&b)));
        let other = Key::new(b"fedcba9876543210").unwrap();
        assert!(!other.verify(&a, &k.tag(&a)));
        assert!(Key::new(b"short").is_err());
    }
}
