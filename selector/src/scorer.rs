//! Scoring: the reference loss of every target position of a batch.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rho_model::{checkpoint, per_token_loss, DecoderLm, ModelError};
use rho_protocol::{Fingerprint, TokenBatch};

/// Something that attaches reference losses to token batches.
pub trait Scorer: Send + Sync {
    /// Identifies the reference model; stamped on every scored batch.
    fn fingerprint(&self) -> &Fingerprint;
    /// Token ids must be below this.
    fn vocab_size(&self) -> usize;
    /// `[rows, window - 1]` losses, row-major; positions past a row's length are 0.
    fn score(&self, batch: &TokenBatch) -> Result<Vec<f32>, ModelError>;
}

/// The `rho-model` decoder on candle, fused inference path.
pub struct CandleScorer {
    model: DecoderLm,
    fingerprint: Fingerprint,
    chunk: Option<usize>,
}

/// The fingerprint of a checkpoint directory: a hash over `config.json` and every weight file.
pub fn model_fingerprint(dir: &Path) -> Result<Fingerprint, ModelError> {
    let io = |p: &Path, e: std::io::Error| ModelError::Checkpoint {
        path: p.to_path_buf(),
        reason: e.to_string(),
    };
    let config = dir.join("config.json");
    let mut parts = vec![Fingerprint::of_file(&config).map_err(|e| io(&config, e))?.0];
    for file in checkpoint::weight_files(dir)? {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        parts.push(format!(
            "{name}={}",
            Fingerprint::of_file(&file).map_err(|e| io(&file, e))?
        ));
    }
    Ok(Fingerprint::of_bytes(parts.join("\n").as_bytes()))
}

impl CandleScorer {
    /// Loads the reference model of a checkpoint directory; `loss_chunk` positions per logits
    /// chunk (default: about 32 MiB of logits).
    pub fn load(
        dir: &Path,
        device: &Device,
        dtype: DType,
        chunk: Option<usize>,
    ) -> Result<Self, ModelError> {
        Ok(CandleScorer {
            model: checkpoint::load(dir, device, dtype)?,
            fingerprint: model_fingerprint(dir)?,
            chunk,
        })
    }

    /// The model.
    pub fn model(&self) -> &DecoderLm {
        &self.model
    }
}

impl Scorer for CandleScorer {
    fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn score(&self, batch: &TokenBatch) -> Result<Vec<f32>, ModelError> {
        let ids = Tensor::from_slice(
            &batch.tokens,
            (batch.rows, batch.window),
            self.model.device(),
        )?;
        let losses = per_token_loss(&self.model, &ids, rho_model::ForwardMode::Fused, self.chunk)?;
        let mut flat = losses.flatten_all()?.to_vec1::<f32>()?;
        let t = batch.window - 1;
        for (b, &len) in batch.lengths.iter().enumerate() {
            let valid = (len as usize).saturating_sub(1);
            flat[b * t + valid..(b + 1) * t].fill(0.0);
        }
        Ok(flat)
    }
}
