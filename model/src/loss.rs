//! Exact per-token losses: `log_softmax` + gather in f32, for every position, computed over
//! chunks of positions so that the full `[B*T, vocab]` logits never exist at once.

use candle_core::{DType, Tensor, D};

use crate::model::{DecoderLm, ForwardMode};
use crate::{ModelError, Result};

/// Positions per logits chunk when the caller does not choose: keeps a chunk's f32 logits near
/// 32 MiB (256 positions for a 32k vocabulary).
pub fn default_chunk(vocab: usize) -> usize {
    ((32usize << 20) / (vocab.max(1) * 4)).clamp(16, 4096)
}

/// `-ln p(ids[b][t+1] | ids[b][..=t])` for every row `b` and position `t < W - 1`, as `[B, W-1]`
/// f32, from token ids `[B, W]` (u32).
pub fn per_token_loss(
    model: &DecoderLm,
    ids: &Tensor,
    mode: ForwardMode,
    chunk: Option<usize>,
) -> Result<Tensor> {
    let (b, w) = ids.dims2()?;
    if w < 2 {
        return Err(ModelError::Config {
            field: "ids",
            reason: "a row needs at least 2 tokens".into(),
        });
    }
    let vocab = model.config().vocab_size;
    if let Some(bad) = ids
        .flatten_all()?
        .to_vec1::<u32>()?
        .into_iter()
        .find(|&i| i as usize >= vocab)
    {
        return Err(ModelError::TokenOutOfRange { id: bad, vocab });
    }
    let t = w - 1;
    let inputs = ids.narrow(1, 0, t)?.contiguous()?;
    let targets = ids.narrow(1, 1, t)?.flatten_all()?;
    let hidden = model.hidden(&inputs, mode)?;
    let h = hidden.dim(2)?;
    let hidden = hidden.reshape((b * t, h))?;
    let head = model.lm_head().t()?;
    let chunk = chunk.unwrap_or_else(|| default_chunk(vocab)).max(1);
    let mut parts = Vec::new();
    let n = b * t;
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let rows = hidden.narrow(0, start, len)?;
        let logits = rows.matmul(&head)?.to_dtype(DType::F32)?;
        let idx = targets.narrow(0, start, len)?;
        if let Some(l) = crate::fused::head_cross_entropy(&logits, &rows, &head, &idx)? {
            parts.push(l);
            start += len;
            continue;
        }
        // The max only shifts for stability; no gradient flows through it.
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let lse = (logits
            .broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?
            + &max)?;
        let picked = logits.gather(&idx.unsqueeze(1)?, 1)?;
        parts.push((lse - picked)?.squeeze(1)?);
        start += len;
    }
    Ok(Tensor::cat(&parts, 0)?.reshape((b, t))?)
}

/// Per-token losses of one document of any length: `losses[i]` for token `i + 1`, from windows
/// of `seq_len + 1` tokens that overlap by one, so that every token but the first is predicted
/// exactly once (with at most `seq_len` tokens of context). Fused path.
pub fn document_losses(model: &DecoderLm, ids: &[u32], seq_len: usize) -> Result<Vec<f32>> {
    let n = ids.len();
    if n < 2 {
        return Ok(Vec::new());
    }
    if seq_len == 0 {
        return Err(ModelError::Config {
            field: "seq_len",
            reason: "must be at least 1".into(),
        });
    }
    let windows = (n - 1).div_ceil(seq_len);
    let w = seq_len.min(n - 1) + 1;
    let mut flat = vec![0u32; windows * w];
    for k in 0..windows {
        let start = k * seq_len;
        let end = (start + w).min(n);
        flat[k * w..k * w + (end - start)].copy_from_slice(&ids[start..end]);
    }
    let t = Tensor::from_vec(flat, (windows, w), model.device())?;
    let l = per_token_loss(model, &t, ForwardMode::Fused, None)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(n - 1);
    for k in 0..windows {
        let targets = (n - 1 - k * seq_len).min(w - 1);
        out.extend_from_slice(&l[k * (w - 1)..k * (w - 1) + targets]);
    }
    Ok(out)
}
