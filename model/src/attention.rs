//! A fused causal softmax for the inference path: softmax over the visible keys of each query
//! (causal, optionally within a sliding window), zeros elsewhere, in one pass without a mask
//! tensor and without exponentiating masked entries. CPU only (f32); other devices use the
//! mask-and-softmax composition.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct CausalSoftmax {
    window: Option<usize>,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("causal-softmax expects f32");
        };
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("causal-softmax expects a contiguous tensor".into())
        })?;
        let data = &data[start..end];
        let dims = layout.dims();
        let t = dims[dims.len() - 1];
        let mut out = vec![0f32; data.len()];
        let window = self.window;
        out.par_chunks_mut(t)
            .zip(data.par_chunks(t))
            .enumerate()
            .for_each(|(row, (o, x))| {
                let i = row % t;
                let lo = window.map_or(0, |w| (i + 1).saturating_sub(w));
                let visible = &x[lo..=i];
                let max = visible.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (dst, &v) in o[lo..=i].iter_mut().zip(visible) {
                    let e = (v - max).exp();
                    *dst = e;
                    sum += e;
                }
                let inv = 1.0 / sum;
                for dst in &mut o[lo..=i] {
                    *dst *= inv;
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Causal (and windowed) softmax over the last dimension of square attention scores
/// `[..., T, T]`, fused on CPU for f32.
pub fn causal_softmax(scores: &Tensor, window: Option<usize>, mask: &Tensor) -> Result<Tensor> {
    let dims = scores.dims();
    let square = dims.len() >= 2 && dims[dims.len() - 1] == dims[dims.len() - 2];
    if scores.device().is_cpu() && scores.dtype() == candle_core::DType::F32 && square {
        scores
            .contiguous()?
            .apply_op1_no_bwd(&CausalSoftmax { window })
    } else {
        candle_nn::ops::softmax_last_dim(&scores.broadcast_add(mask)?)
    }
}

struct RowLoss;

impl candle_core::CustomOp2 for RowLoss {
    fn name(&self) -> &'static str {
        "row-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(logits), CpuStorage::U32(targets)) = (s1, s2) else {
            candle_core::bail!("row-cross-entropy expects f32 logits and u32 targets");
        };
        let (Some((a, b)), Some((c, d))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("row-cross-entropy expects contiguous inputs");
        };
        let (logits, targets) = (&logits[a..b], &targets[c..d]);
        let v = l1.dims()[1];
        let out: Vec<f32> = logits
            .par_chunks(v)
            .zip(targets.par_iter())
            .map(|(row, &t)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
                sum.ln() + max - row[t as usize]
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(targets.len())))
    }
}

/// `logsumexp(logits[i]) - logits[i][targets[i]]` for `[N, V]` f32 logits and `[N]` u32 targets,
/// fused and parallel over rows on CPU; `None` where the fused kernel does not apply.
pub fn row_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Option<Tensor>> {
    if !logits.device().is_cpu()
        || logits.dtype() != candle_core::DType::F32
        || targets.dtype() != candle_core::DType::U32
    {
        return Ok(None);
    }
    let logits = logits.contiguous()?;
    let targets = targets.contiguous()?;
    Ok(Some(logits.apply_op2_no_bwd(&targets, &RowLoss)?))
}
