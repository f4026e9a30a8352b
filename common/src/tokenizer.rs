//! Loading a HuggingFace `tokenizer.json` the one way every rho process does.
//!
//! A tokenizer file may carry its own `padding` and `truncation` settings (many published
//! BERT-style and sentence-embedding tokenizers ship `"padding": {"Fixed": 128}` and
//! `"truncation": {"max_length": 128}`). Kept, they would cut every long document and fill every
//! short one with padding, silently. rho encodes documents as `[BOS] ids(text) [EOS]`
//! (docs/PROTOCOL.md) and packs them itself, so both settings are turned off on load, and a
//! warning says once, naming the file, what was ignored. The fingerprint stays that of the file's
//! bytes, as written.

use std::path::Path;

use tokenizers::Tokenizer;

use rho_protocol::Fingerprint;

/// A tokenizer ready to encode documents, and the fingerprint of its file.
pub struct LoadedTokenizer {
    /// The tokenizer, its padding and truncation off.
    pub tokenizer: Tokenizer,
    /// The fingerprint of the file.
    pub fingerprint: Fingerprint,
    /// What the file set that was turned off (`padding`, `truncation`), for the caller to report.
    pub ignored: Vec<&'static str>,
}

/// Reads `path`; the error is the reason only (callers name the file in their own error type).
pub fn load(path: &Path) -> Result<LoadedTokenizer, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    from_bytes(&bytes, path)
}

/// Parses a `tokenizer.json` read from `origin` and turns off its padding and truncation.
pub fn from_bytes(bytes: &[u8], origin: &Path) -> Result<LoadedTokenizer, String> {
    let mut tokenizer =
        Tokenizer::from_bytes(bytes).map_err(|e| format!("not a tokenizer.json: {e}"))?;
    let mut ignored = Vec::new();
    if tokenizer.get_padding().is_some() {
        tokenizer.with_padding(None);
        ignored.push("padding");
    }
    if tokenizer.get_truncation().is_some() {
        tokenizer
            .with_truncation(None)
            .map_err(|e| format!("cannot turn off truncation: {e}"))?;
        ignored.push("truncation");
    }
    if !ignored.is_empty() {
        tracing::warn!(
            tokenizer = %origin.display(),
            "ignoring the tokenizer file's own {}: rho encodes whole documents and packs them itself",
            ignored.join(" and ")
        );
    }
    Ok(LoadedTokenizer {
        tokenizer,
        fingerprint: Fingerprint::of_bytes(bytes),
        ignored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer that pads and truncates to 4 ids, as BERT-style files do.
    pub(crate) const PADDED: &str = r#"{
      "version": "1.0",
      "truncation": {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0},
      "padding": {"strategy": {"Fixed": 4}, "direction": "Right", "pad_to_multiple_of": null,
                  "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
      "added_tokens": [],
      "normalizer": null,
      "pre_tokenizer": {"type": "Whitespace"},
      "post_processor": null,
      "decoder": null,
      "model": {"type": "WordLevel", "vocab": {"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3, "c": 4},
                "unk_token": "[UNK]"}
    }"#;

    #[test]
    fn padding_and_truncation_of_the_file_are_turned_off() {
        let raw = Tokenizer::from_bytes(PADDED.as_bytes()).unwrap();
        let long = "a b c a b c a b";
        assert_eq!(raw.encode(long, false).unwrap().get_ids().len(), 4);
        assert_eq!(raw.encode("a", false).unwrap().get_ids(), &[2, 0, 0, 0]);

        let t = from_bytes(PADDED.as_bytes(), Path::new("padded.json")).unwrap();
        assert_eq!(t.ignored, vec!["padding", "truncation"]);
        assert_eq!(t.tokenizer.encode(long, false).unwrap().get_ids().len(), 8);
        assert_eq!(t.tokenizer.encode("a", false).unwrap().get_ids(), &[2]);
        assert_eq!(t.fingerprint, Fingerprint::of_bytes(PADDED.as_bytes()));
    }

    #[test]
    fn a_plain_file_ignores_nothing() {
        let plain = PADDED
            .replace(r#""truncation": {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0},"#, r#""truncation": null,"#);
        let t = from_bytes(plain.as_bytes(), Path::new("p.json")).unwrap();
        assert_eq!(t.ignored, vec!["padding"]);
        assert!(from_bytes(b"{}", Path::new("bad.json")).is_err());
    }
}
