use crate::Fingerprint;

/// A batch of packed token windows, as the loader issues it.
///
/// Row `b` holds `window = seq_len + 1` token ids: inputs are `tokens[b][..seq_len]`, targets
/// `tokens[b][1..]`. Only the first `lengths[b]` ids of a row are real data (the last window of
/// the stream is padded); a target position `t` is valid when `t + 1 < lengths[b]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    /// The run this batch belongs to; a message of another run is refused.
    pub run_id: String,
    /// Global batch sequence number: the trainer consumes batches in this order, once each.
    pub seq: u64,
    /// The epoch of the batch's first row.
    pub epoch: u64,
    /// Number of rows (B).
    pub rows: usize,
    /// Tokens per row (T + 1).
    pub window: usize,
    /// Fingerprint of the `tokenizer.json` that produced the ids.
    pub tokenizer: Fingerprint,
    /// Row-major token ids, `rows * window` of them.
    pub tokens: Vec<u32>,
    /// Real (non-padding) tokens in each row, `<= window`.
    pub lengths: Vec<u32>,
    /// For each row, the strictly increasing positions at which a document starts.
    pub doc_starts: Vec<Vec<u32>>,
    /// The identity of the stream the batch belongs to (what shapes it), when its loader said.
    pub stream: Option<Box<crate::StreamIdentity>>,
    /// The data-parallel rank this batch is for, when its loader splits the stream among
    /// several (docs/PROTOCOL.md, "Several ranks"); `None`: a stream of one rank.
    pub rank: Option<crate::Rank>,
}

impl TokenBatch {
    /// Row `b`'s token ids.
    pub fn row(&self, b: usize) -> &[u32] {
        &self.tokens[b * self.window..(b + 1) * self.window]
    }

    /// Number of target positions per row (T).
    pub fn seq_len(&self) -> usize {
        self.window.saturating_sub(1)
    }

    /// Number of valid target positions in the batch.
    pub fn target_count(&self) -> usize {
        self.lengths
            .iter()
            .map(|&l| (l as usize).saturating_sub(1))
            .sum()
    }
}
