//! Tokenization with a HuggingFace `tokenizer.json`, and how documents become token runs.
//!
//! A document becomes `[BOS] ids(text) [EOS]` (BOS and EOS as configured), where `ids` is the
//! tokenizer's encoding of the text without its own special tokens (`add_special_tokens =
//! false`). A document longer than `max_doc_bytes` is cut into pieces at whitespace near each
//! limit (or at a character boundary), each piece encoded alone and the ids concatenated: the
//! tokens at the cuts may differ from encoding the whole text at once, the price of bounded memory.

use std::path::Path;

use rho_protocol::Fingerprint;
use tokenizers::Tokenizer;

use crate::config::LoaderConfig;
use crate::{LoaderError, Result};

/// A piece of a document: the unit of parallel tokenization.
#[derive(Debug, Clone)]
pub struct Segment {
    /// The text.
    pub text: String,
    /// The document starts with this piece (gets BOS, marks a document start).
    pub first: bool,
    /// The document ends with this piece (gets EOS).
    pub last: bool,
}

/// A loaded tokenizer with the special-token policy of a loader config.
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    fingerprint: Fingerprint,
    bos: Option<u32>,
    eos: Option<u32>,
    max_doc_bytes: usize,
}

const BOS_NAMES: [&str; 3] = ["<s>", "<|begin_of_text|>", "<bos>"];
const EOS_NAMES: [&str; 4] = ["</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"];

impl TextTokenizer {
    /// Loads `config.tokenizer` and resolves the configured BOS / EOS tokens.
    pub fn load(config: &LoaderConfig) -> Result<Self> {
        Self::from_file(
            &config.tokenizer,
            config.add_bos.then_some(config.bos_token.as_deref()),
            config.add_eos.then_some(config.eos_token.as_deref()),
            config.max_doc_bytes,
        )
    }

    /// `bos` / `eos`: `None` = not added; `Some(None)` = added, default name; `Some(Some(s))` = token `s`.
    pub fn from_file(
        path: &Path,
        bos: Option<Option<&str>>,
        eos: Option<Option<&str>>,
        max_doc_bytes: usize,
    ) -> Result<Self> {
        let err = |reason: String| LoaderError::Tokenizer {
            path: path.to_path_buf(),
            reason,
        };
        let rho_common::tokenizer::LoadedTokenizer {
            tokenizer,
            fingerprint,
            ..
        } = rho_common::tokenizer::load(path).map_err(err)?;
        let resolve =
            |want: Option<Option<&str>>, defaults: &[&str], field: &'static str| match want {
                None => Ok(None),
                Some(Some(name)) => {
                    tokenizer
                        .token_to_id(name)
                        .map(Some)
                        .ok_or_else(|| LoaderError::ConfigField {
                            field,
                            reason: format!("token `{name}` is not in {}", path.display()),
                        })
                }
                Some(None) => defaults
                    .iter()
                    .find_map(|n| tokenizer.token_to_id(n))
                    .map(Some)
                    .ok_or_else(|| LoaderError::ConfigField {
                        field,
                        reason: format!(
                            "{} has none of {defaults:?}; name the token",
                            path.display()
                        ),
                    }),
            };
        let bos = resolve(bos, &BOS_NAMES, "bos_token")?;
        let eos = resolve(eos, &EOS_NAMES, "eos_token")?;
        Ok(TextTokenizer {
            fingerprint,
            tokenizer,
            bos,
            eos,
            max_doc_bytes: max_doc_bytes.max(1024),
        })
    }

    /// The fingerprint of the tokenizer file.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// Its vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The id padding positions hold (EOS, else 0). Padding is marked by row lengths, never by id.
    pub fn pad_id(&self) -> u32 {
        self.eos.unwrap_or(0)
    }

    /// The HuggingFace tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Cuts a document into segments of at most `max_doc_bytes` (one segment when it is shorter).
    pub fn segments(&self, text: String) -> Vec<Segment> {
        if text.len() <= self.max_doc_bytes {
            return vec![Segment {
                text,
                first: true,
                last: true,
            }];
        }
        let mut out = Vec::new();
        let mut rest = text.as_str();
        while !rest.is_empty() {
            let cut = cut_point(rest, self.max_doc_bytes);
            out.push(Segment {
                text: rest[..cut].to_string(),
                first: out.is_empty(),
                last: false,
            });
            rest = &rest[cut..];
        }
        if let Some(s) = out.last_mut() {
            s.last = true;
        }
        out
    }

    /// The ids of one segment, with BOS / EOS as the segment's place in its document asks.
    pub fn encode(&self, segment: &Segment) -> Vec<u32> {
        let encoded = match self.tokenizer.encode_fast(segment.text.as_str(), false) {
            Ok(e) => e,
            Err(e) => {
                // Tokenizers fail only on inputs their normalizers reject; keep the document
                // boundary so the stream stays consistent.
                tracing::warn!("tokenizer refused a segment: {e}");
                return self
                    .bos
                    .filter(|_| segment.first)
                    .into_iter()
                    .chain(self.eos.filter(|_| segment.last))
                    .collect();
            }
        };
        let ids = encoded.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 2);
        if segment.first {
            out.extend(self.bos);
        }
        out.extend_from_slice(ids);
        if segment.last {
            out.extend(self.eos);
        }
        out
    }
}

/// A byte offset `<= max` on a char boundary, preferring just after whitespace in the last KiB.
fn cut_point(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let floor = end.saturating_sub(1024);
    let bytes = s.as_bytes();
    (floor..end)
        .rev()
        .find(|&i| bytes[i].is_ascii_whitespace())
        .map(|i| i + 1)
        .filter(|&c| c > 0)
        .unwrap_or(if end == 0 {
            s.chars().next().map_or(s.len(), char::len_utf8)
        } else {
            end
        })
}

#[cfg(test)]
mod tests {
    use super::cut_point;

    #[test]
    fn cuts_on_whitespace_or_char_boundary() {
        assert_eq!(cut_point("hello world again", 13), 12);
        let s = "é".repeat(2000); // 2 bytes each, no whitespace
        let c = cut_point(&s, 1025);
        assert!(s.is_char_boundary(c) && c <= 1025 && c > 0);
        assert_eq!(cut_point("short", 100), 5);
    }
}
