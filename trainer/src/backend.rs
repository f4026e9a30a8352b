//! Trainer backends behind one trait: the candle backend trains; the null backend only consumes
//! (for measuring the pipeline without training). An external consumer of the protocol (a
//! PyTorch loop) takes the trainer's place at the protocol boundary, not here.

use std::path::Path;

use rho_protocol::TokenBatch;
use serde::{Deserialize, Serialize};

use crate::selection::{self, Selection};
use crate::Result;

/// One step's data: token windows and, when scored, the reference losses.
#[derive(Debug, Clone)]
pub struct StepInput {
    /// The token windows.
    pub batch: TokenBatch,
    /// `[rows, window - 1]` reference losses.
    pub ref_loss: Option<Vec<f32>>,
}

impl StepInput {
    /// Which target positions are real (not padding), row-major `[rows, window - 1]`.
    pub fn valid(&self) -> Vec<bool> {
        let t = self.batch.window - 1;
        let mut v = Vec::with_capacity(self.batch.rows * t);
        for &len in &self.batch.lengths {
            let n = (len as usize).saturating_sub(1);
            v.extend((0..t).map(|i| i < n));
        }
        v
    }
}

/// What a step measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StepStats {
    /// Mean loss over the selected tokens (the trained objective).
    pub loss_selected: f32,
    /// Mean loss over every valid token.
    pub loss_all: f32,
    /// Selected tokens / valid tokens.
    pub selected_fraction: f32,
    /// Mean `L_theta - L_ref` over valid tokens (0 without reference).
    pub mean_excess: f32,
    /// The learning rate of the step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Valid target tokens in the step.
    pub tokens: u64,
}

/// A trainer backend.
pub trait Backend: Send {
    /// Trains on one step's batch (step numbers start at 0).
    fn step(&mut self, step: u64, input: &StepInput, selection: &Selection) -> Result<StepStats>;
    /// Mean loss over every valid token of held-out batches.
    fn eval(&mut self, batches: &[TokenBatch]) -> Result<f32>;
    /// Writes the model (a HuggingFace directory) and optimizer state under `dir`.
    fn save(&self, dir: &Path) -> Result<()>;
    /// Restores what [`Backend::save`] wrote.
    fn load(&mut self, dir: &Path) -> Result<()>;
}

/// Consumes and acknowledges; trains nothing. Selection statistics are still computed from the
/// reference losses (with a current loss of 0), so the pipeline can be measured end to end.
#[derive(Debug, Default)]
pub struct NullBackend;

impl Backend for NullBackend {
    fn step(&mut self, step: u64, input: &StepInput, selection: &Selection) -> Result<StepStats> {
        let valid = input.valid();
        let n = valid.iter().filter(|v| **v).count();
        let zeros = vec![0f32; valid.len()];
        let mask = selection.mask(
            step,
            &selection::Losses {
                rows: input.batch.rows,
                len: input.batch.window - 1,
                current: &zeros,
                reference: input.ref_loss.as_deref(),
                valid: &valid,
            },
        );
        let kept: f32 = mask.iter().sum();
        Ok(StepStats {
            selected_fraction: if n == 0 { 0.0 } else { kept / n as f32 },
            tokens: n as u64,
            ..Default::default()
        })
    }

    fn eval(&mut self, _batches: &[TokenBatch]) -> Result<f32> {
        Ok(0.0)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| crate::TrainerError::io(dir, e))
    }

    fn load(&mut self, _dir: &Path) -> Result<()> {
        Ok(())
    }
}
