//! The identity of a stream: everything the contents of batch `n` depend on. A loader stamps it
//! on every batch it issues (the header field `stream`), a trainer records it in its
//! checkpoints, and a resume is refused where it differs, with the item named.

use serde::{Deserialize, Serialize};

use crate::Fingerprint;

/// What shapes a loader's stream. Two loaders with the same identity issue the same batch `n`
/// for every `n`; any difference may change every batch. `epochs` is left out (more passes
/// only extend the stream), and so are `rank` and `world` (the ranks split one global stream:
/// batch `g` is the same whichever rank issues it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamIdentity {
    /// The fingerprint of the tokenizer (`loader.tokenizer`).
    pub tokenizer: Fingerprint,
    /// `loader.seq_len`.
    pub seq_len: u64,
    /// `loader.batch_size`.
    pub batch_size: u64,
    /// `loader.seed`.
    pub seed: u64,
    /// `loader.shuffle_window`.
    pub shuffle_window: u64,
    /// `loader.add_bos`.
    pub add_bos: bool,
    /// `loader.add_eos`.
    pub add_eos: bool,
    /// `loader.bos_token`, as configured (`None`: the tokenizer's default).
    #[serde(default)]
    pub bos_token: Option<String>,
    /// `loader.eos_token`, as configured.
    #[serde(default)]
    pub eos_token: Option<String>,
    /// `loader.data.text_field`.
    pub text_field: String,
    /// `loader.data.format`.
    pub format: String,
    /// `loader.max_doc_bytes`.
    pub max_doc_bytes: u64,
    /// The shards `loader.data.paths` found.
    pub corpus: Corpus,
}

/// The shards of a stream: how many, their bytes, and a digest of every shard's path, size and
/// modification time (`path\tbytes\tmtime_ns` lines, sorted by path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Corpus {
    /// Shards found.
    pub shards: u64,
    /// Their bytes together.
    pub bytes: u64,
    /// `sha256:` of their paths, sizes and modification times.
    pub digest: Fingerprint,
}

impl std::fmt::Display for Corpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} shards of {} bytes ({})",
            self.shards, self.bytes, self.digest
        )
    }
}

/// One item in which two stream identities differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// The config field (`loader.seq_len`, `loader.data.paths` for the corpus).
    pub item: &'static str,
    /// Its value then (in the checkpoint).
    pub then: String,
    /// Its value now.
    pub now: String,
}

impl Difference {
    /// `item: <then> <then_is>, <now> <now_is>`, as in `loader.seq_len: 64 in the checkpoint,
    /// 32 now`.
    pub fn describe(&self, then_is: &str, now_is: &str) -> String {
        format!(
            "{}: {} {then_is}, {} {now_is}",
            self.item, self.then, self.now
        )
    }
}

/// Every difference, described (`; ` between them).
pub fn describe_differences(differences: &[Difference], then_is: &str, now_is: &str) -> String {
    differences
        .iter()
        .map(|d| d.describe(then_is, now_is))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Every item a [`Difference`] can name, as configs name them (for lists of accepted changes).
pub const STREAM_ITEMS: &[&str] = &[
    "loader.tokenizer",
    "loader.seq_len",
    "loader.batch_size",
    "loader.seed",
    "loader.shuffle_window",
    "loader.add_bos",
    "loader.add_eos",
    "loader.bos_token",
    "loader.eos_token",
    "loader.data.text_field",
    "loader.data.format",
    "loader.max_doc_bytes",
    "loader.data.paths",
];

impl StreamIdentity {
    /// The items in which `now` differs from `self`, in [`STREAM_ITEMS`] order.
    pub fn differences(&self, now: &StreamIdentity) -> Vec<Difference> {
        fn opt(v: &Option<String>) -> String {
            v.as_deref().map_or("unset".into(), |s| format!("`{s}`"))
        }
        let pairs: [(&'static str, String, String); 13] = [
            (
                "loader.tokenizer",
                self.tokenizer.to_string(),
                now.tokenizer.to_string(),
            ),
            (
                "loader.seq_len",
                self.seq_len.to_string(),
                now.seq_len.to_string(),
            ),
            (
                "loader.batch_size",
                self.batch_size.to_string(),
                now.batch_size.to_string(),
            ),
            ("loader.seed", self.seed.to_string(), now.seed.to_string()),
            (
                "loader.shuffle_window",
                self.shuffle_window.to_string(),
                now.shuffle_window.to_string(),
            ),
            (
                "loader.add_bos",
                self.add_bos.to_string(),
                now.add_bos.to_string(),
            ),
            (
                "loader.add_eos",
                self.add_eos.to_string(),
                now.add_eos.to_string(),
            ),
            (
                "loader.bos_token",
                opt(&self.bos_token),
                opt(&now.bos_token),
            ),
            (
                "loader.eos_token",
                opt(&self.eos_token),
                opt(&now.eos_token),
            ),
            (
                "loader.data.text_field",
                format!("`{}`", self.text_field),
                format!("`{}`", now.text_field),
            ),
            (
                "loader.data.format",
                self.format.clone(),
                now.format.clone(),
            ),
            (
                "loader.max_doc_bytes",
                self.max_doc_bytes.to_string(),
                now.max_doc_bytes.to_string(),
            ),
            (
                "loader.data.paths",
                self.corpus.to_string(),
                now.corpus.to_string(),
            ),
        ];
        pairs
            .into_iter()
            .filter(|(_, a, b)| a != b)
            .map(|(item, then, now)| Difference { item, then, now })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn identity() -> StreamIdentity {
        StreamIdentity {
            tokenizer: Fingerprint::of_bytes(b"t"),
            seq_len: 64,
            batch_size: 4,
            seed: 0,
            shuffle_window: 64,
            add_bos: false,
            add_eos: true,
            bos_token: None,
            eos_token: None,
            text_field: "text".into(),
            format: "auto".into(),
            max_doc_bytes: 1 << 20,
            corpus: Corpus {
                shards: 2,
                bytes: 100,
                digest: Fingerprint::of_bytes(b"c"),
            },
        }
    }

    #[test]
    fn differences_name_each_changed_item() {
        let a = identity();
        assert!(a.differences(&a).is_empty());
        let mut b = a.clone();
        b.seq_len = 32;
        b.corpus.shards = 3;
        let d = a.differences(&b);
        assert_eq!(d.len(), 2);
        assert_eq!(
            d[0].describe("in the checkpoint", "now"),
            "loader.seq_len: 64 in the checkpoint, 32 now"
        );
        assert_eq!(d[1].item, "loader.data.paths");
        assert!(d.iter().all(|d| STREAM_ITEMS.contains(&d.item)));
    }
}
