use crate::{Fingerprint, TokenBatch};

/// A token batch with the reference model's loss attached to every target position.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredBatch {
    /// The token windows.
    pub batch: TokenBatch,
    /// Fingerprint of the reference model that produced `ref_loss`.
    pub ref_model: Fingerprint,
    /// Row-major `[rows, window - 1]`: `ref_loss[b][t] = -ln p_ref(tokens[b][t+1] | tokens[b][..=t])`.
    /// Positions past a row's length hold 0 and must be ignored.
    pub ref_loss: Vec<f32>,
}
