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

impl ScoredBatch {
    /// The first valid target position whose reference loss is not a finite number, as
    /// `(row, position, value)`; padding is not looked at. A consumer refuses such a batch.
    pub fn first_non_finite(&self) -> Option<(usize, usize, f32)> {
        first_non_finite(&self.batch, &self.ref_loss)
    }
}

/// [`ScoredBatch::first_non_finite`] of `batch` scored with `ref_loss` (row-major
/// `[rows, window - 1]`).
pub fn first_non_finite(batch: &TokenBatch, ref_loss: &[f32]) -> Option<(usize, usize, f32)> {
    let t = batch.window.saturating_sub(1);
    batch.lengths.iter().enumerate().find_map(|(row, &len)| {
        let start = row * t;
        let n = (len as usize).saturating_sub(1).min(t);
        ref_loss
            .get(start..start + n)?
            .iter()
            .position(|x| !x.is_finite())
            .map(|pos| (row, pos, ref_loss[start + pos]))
    })
}
