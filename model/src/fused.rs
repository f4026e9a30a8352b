//! Fused CPU kernels (f32, parallel over rows) with their backward passes, so that both the
//! inference and the training path use them:
//! - a causal softmax: softmax over the visible keys of each query (causal, optionally within a
//!   sliding window), zeros elsewhere, without a mask tensor and without exponentiating masked
//!   entries;
//! - a row cross-entropy: `logsumexp(logits) - logits[target]` per row, without materializing
//!   the log-probabilities.
//!
//! Other devices use the equivalent compositions of tensor ops.

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

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // d softmax: y * (g - sum(g * y)) per row; masked entries have y = 0 and get 0.
        Ok(Some(res.contiguous()?.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &SoftmaxBackward,
        )?))
    }
}

struct SoftmaxBackward;

impl candle_core::CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(y), CpuStorage::F32(g)) = (s1, s2) else {
            candle_core::bail!("softmax-backward expects f32");
        };
        let (Some((a, b)), Some((c, d))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("softmax-backward expects contiguous inputs");
        };
        let (y, g) = (&y[a..b], &g[c..d]);
        let t = l1.dims()[l1.dims().len() - 1];
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(t)
            .zip(y.par_chunks(t).zip(g.par_chunks(t)))
            .for_each(|(o, (y, g))| {
                let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                    *o = y * (g - dot);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Whether [`causal_softmax`] runs fused for tensors on `device` of `dtype`.
pub fn causal_softmax_applies(device: &candle_core::Device, dtype: candle_core::DType) -> bool {
    device.is_cpu() && dtype == candle_core::DType::F32
}

/// Causal (and windowed) softmax over the last dimension of square attention scores
/// `[..., T, T]`, fused on CPU for f32 and differentiable; `None` where the fused kernel does
/// not apply (not CPU, not f32).
pub fn causal_softmax(scores: &Tensor, window: Option<usize>) -> Result<Option<Tensor>> {
    let dims = scores.dims();
    let square = dims.len() >= 2 && dims[dims.len() - 1] == dims[dims.len() - 2];
    if causal_softmax_applies(scores.device(), scores.dtype()) && square {
        Ok(Some(
            scores.contiguous()?.apply_op1(CausalSoftmax { window })?,
        ))
    } else {
        Ok(None)
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

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // d/dlogits = g * (softmax(logits) - onehot(target)); targets get no gradient.
        let g = logits.contiguous()?.apply_op3_no_bwd(
            &targets.contiguous()?,
            &grad_res.contiguous()?,
            &RowLossBackward,
        )?;
        Ok((Some(g), None))
    }
}

struct RowLossBackward;

impl candle_core::CustomOp3 for RowLossBackward {
    fn name(&self) -> &'static str {
        "row-cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(logits), CpuStorage::U32(targets), CpuStorage::F32(grad)) =
            (s1, s2, s3)
        else {
            candle_core::bail!(
                "row-cross-entropy-backward expects f32 logits, u32 targets, f32 gradients"
            );
        };
        let (Some((a, b)), Some((c, d)), Some((e, f))) = (
            l1.contiguous_offsets(),
            l2.contiguous_offsets(),
            l3.contiguous_offsets(),
        ) else {
            candle_core::bail!("row-cross-entropy-backward expects contiguous inputs");
        };
        let (logits, targets, grad) = (&logits[a..b], &targets[c..d], &grad[e..f]);
        let v = l1.dims()[1];
        let mut out = vec![0f32; logits.len()];
        out.par_chunks_mut(v)
            .zip(logits.par_chunks(v))
            .zip(targets.par_iter().zip(grad.par_iter()))
            .for_each(|((o, row), (&t, &g))| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (o, &x) in o.iter_mut().zip(row) {
                    let e = (x - max).exp();
                    *o = e;
                    sum += e;
                }
                let scale = g / sum;
                for o in o.iter_mut() {
                    *o *= scale;
                }
                o[t as usize] -= g;
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `logsumexp(logits[i]) - logits[i][targets[i]]` for `[N, V]` f32 logits and `[N]` u32 targets,
/// fused and parallel over rows on CPU, differentiable in `logits`; `None` where the fused kernel
/// does not apply.
pub fn row_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Option<Tensor>> {
    if !logits.device().is_cpu()
        || logits.dtype() != candle_core::DType::F32
        || targets.dtype() != candle_core::DType::U32
    {
        return Ok(None);
    }
    let logits = logits.contiguous()?;
    let targets = targets.contiguous()?;
    Ok(Some(logits.apply_op2(&targets, RowLoss)?))
}
