//! Fused CPU kernels (f32, parallel over rows) with their backward passes, so that both the
//! inference and the training path use them:
//! - a causal softmax: softmax over the visible keys of each query (causal, optionally within a
//!   sliding window), zeros elsewhere, without a mask tensor and without exponentiating masked
//!   entries;
//! - the LM head's cross-entropy: `logsumexp(logits) - logits[target]` per row, without
//!   materializing the log-probabilities, and a backward pass through the head that leaves out
//!   the rows whose loss gets no gradient (the tokens selective language modeling does not
//!   train on);
//! - SwiGLU's `silu(gate) * up` and RMSNorm, each one pass forward and one backward instead of
//!   five to ten tensor ops (and as many gradients for candle's backward pass to accumulate);
//! - the heads of a projection: the linear layer's rows split into heads, rotated by RoPE and
//!   scaled in one pass, where the composition makes a transposed copy, then RoPE, then the
//!   scaling (bit for bit the composition's values and gradients).
//!
//! Other devices use the equivalent compositions of tensor ops.

use crate::vmath;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// The contiguous f32 slice of a storage, or an error naming the op.
pub(crate) fn f32_slice<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{op} expects f32");
    };
    Ok(&data[offsets(op, l)?])
}

fn offsets(op: &str, l: &Layout) -> Result<std::ops::Range<usize>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op} expects contiguous inputs")))?;
    Ok(a..b)
}

/// Three contiguous f32 slices: the inputs of a backward kernel.
pub(crate) fn f32_slices3<'a>(
    op: &str,
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
    (s3, l3): (&'a CpuStorage, &Layout),
) -> Result<(&'a [f32], &'a [f32], &'a [f32])> {
    Ok((
        f32_slice(op, s1, l1)?,
        f32_slice(op, s2, l2)?,
        f32_slice(op, s3, l3)?,
    ))
}

/// `n` zeros, written on the rayon pool: the kernels' outputs are large (a `[B, nh, T, T]`
/// attention map is 25 MB at 4 x 6 x 512 x 512), and one thread clearing them held up the other.
pub(crate) fn par_zeros(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    v.par_extend(rayon::iter::repeat_n(0f32, n));
    v
}

/// The first key query `i` sees: 0, or the start of its sliding window.
pub(crate) fn first_key(i: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (i + 1).saturating_sub(w))
}

/// The keys query `i` sees: `first_key..=i`.
fn visible(i: usize, window: Option<usize>) -> std::ops::RangeInclusive<usize> {
    first_key(i, window)..=i
}

struct CausalSoftmax {
    window: Option<usize>,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let data = f32_slice("causal-softmax", storage, layout)?;
        let dims = layout.dims();
        let t = dims[dims.len() - 1];
        let mut out = par_zeros(data.len());
        let window = self.window;
        out.par_chunks_mut(t)
            .zip(data.par_chunks(t))
            .enumerate()
            .for_each(|(row, (o, x))| {
                let keys = visible(row % t, window);
                let (visible, o) = (&x[keys.clone()], &mut o[keys]);
                vmath::exp_shifted(o, visible, vmath::max(visible));
                vmath::scale(o, 1.0 / vmath::sum(o));
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // d softmax: y * (g - sum(g * y)) per row; masked entries have y = 0 and get 0.
        Ok(Some(res.contiguous()?.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &SoftmaxBackward {
                window: self.window,
            },
        )?))
    }
}

/// The backward pass of [`CausalSoftmax`], over each query's visible keys only.
struct SoftmaxBackward {
    window: Option<usize>,
}

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
        let op = "softmax-backward";
        let (y, g) = (f32_slice(op, s1, l1)?, f32_slice(op, s2, l2)?);
        let t = l1.dims()[l1.dims().len() - 1];
        let mut out = par_zeros(y.len());
        let window = self.window;
        out.par_chunks_mut(t)
            .zip(y.par_chunks(t).zip(g.par_chunks(t)))
            .enumerate()
            .for_each(|(row, (o, (y, g)))| {
                let keys = visible(row % t, window);
                let (o, y, g) = (&mut o[keys.clone()], &y[keys.clone()], &g[keys]);
                let dot = vmath::dot(y, g);
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

/// The LM head's cross-entropy, `logsumexp(logits[i]) - logits[i][targets[i]]` with
/// `logits = h head`, differentiable in `h` `[N, D]` and `head` `[D, V]` (the transposed
/// weight). The op takes the logits made by candle's matmul, detached, so that the backward
/// pass through the head is this op's.
///
/// That backward pass works on the rows whose loss has a nonzero gradient only. Selective
/// language modeling trains on the top k% of the tokens, so the other rows' logit gradients are
/// zero; the composition would still build them and multiply them into both products of the
/// head's backward pass (`dh = dlogits head^T` and `dhead = h^T dlogits`, the largest products
/// of a step with a large vocabulary). With every row selected, the products are the
/// composition's, operand for operand.
struct HeadLoss {
    targets: Vec<u32>,
}

impl candle_core::CustomOp3 for HeadLoss {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        _s3: &CpuStorage,
        _l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let logits = f32_slice("head-cross-entropy", s1, l1)?;
        let out = row_losses(logits, &self.targets, l1.dims()[1]);
        Ok((CpuStorage::F32(out), Shape::from(self.targets.len())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        h: &Tensor,
        head: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.to_vec1::<f32>()?;
        let rows: Vec<u32> = (0..grad.len() as u32)
            .filter(|&i| grad[i as usize] != 0.0)
            .collect();
        if rows.is_empty() {
            return Ok((None, None, None));
        }
        let all = rows.len() == grad.len();
        let op = SelectedRowLossBackward {
            targets: rows.iter().map(|&i| self.targets[i as usize]).collect(),
            grad: rows.iter().map(|&i| grad[i as usize]).collect(),
            rows,
        };
        let dlogits = logits.contiguous()?.apply_op1_no_bwd(&op)?;
        // The composition's products (candle's matmul backward), on the selected rows.
        let (dh, dhead) = if all {
            (dlogits.matmul(&head.t()?)?, h.t()?.matmul(&dlogits)?)
        } else {
            let idx = Tensor::new(op.rows.as_slice(), h.device())?;
            let hs = h.index_select(&idx, 0)?;
            let dh = h
                .zeros_like()?
                .index_add(&idx, &dlogits.matmul(&head.t()?)?, 0)?;
            (dh, hs.t()?.matmul(&dlogits)?)
        };
        Ok((None, Some(dh), Some(dhead)))
    }
}

/// The logit gradients `g * (softmax(logits) - onehot(target))` of the chosen rows of `[N, V]`
/// logits, as `[rows.len(), V]`.
struct SelectedRowLossBackward {
    rows: Vec<u32>,
    targets: Vec<u32>,
    grad: Vec<f32>,
}

impl CustomOp1 for SelectedRowLossBackward {
    fn name(&self) -> &'static str {
        "head-cross-entropy-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = "head-cross-entropy-backward";
        let logits = f32_slice(op, s, l)?;
        let v = l.dims()[1];
        if let Some(&r) = self
            .rows
            .iter()
            .find(|&&r| (r as usize + 1) * v > logits.len())
        {
            candle_core::bail!("{op}: row {r} is past the logits");
        }
        let mut out = par_zeros(self.rows.len() * v);
        out.par_chunks_mut(v)
            .zip(self.rows.par_iter())
            .zip(self.targets.par_iter().zip(self.grad.par_iter()))
            .for_each(|((o, &r), (&t, &g))| {
                row_loss_grad(o, &logits[r as usize * v..(r as usize + 1) * v], t, g)
            });
        Ok((CpuStorage::F32(out), Shape::from((self.rows.len(), v))))
    }
}

/// `logsumexp(logits[i]) - logits[i][targets[i]]` of every row of `[N, V]` logits.
fn row_losses(logits: &[f32], targets: &[u32], v: usize) -> Vec<f32> {
    logits
        .par_chunks(v)
        .zip(targets.par_iter())
        .map_init(
            || vec![0f32; v],
            |e, (row, &t)| {
                let max = vmath::max(row);
                vmath::exp_shifted(e, row, max);
                vmath::sum(e).ln() + max - row[t as usize]
            },
        )
        .collect()
}

/// One row's logit gradient `g * (softmax(row) - onehot(t))`, written to `o`.
fn row_loss_grad(o: &mut [f32], row: &[f32], t: u32, g: f32) {
    vmath::exp_shifted(o, row, vmath::max(row));
    vmath::scale(o, g / vmath::sum(o));
    o[t as usize] -= g;
}

/// The LM head's per-row cross-entropy from `logits = h head` (`[N, V]` f32, as made by the
/// caller), `h` `[N, D]`, `head` `[D, V]` and `[N]` u32 targets; differentiable in `h` and
/// `head`, with a backward pass over the rows whose loss has a gradient only (the `HeadLoss` op).
/// `None` where the fused kernel does not apply (not CPU, or not all f32).
pub fn head_cross_entropy(
    logits: &Tensor,
    h: &Tensor,
    head: &Tensor,
    targets: &Tensor,
) -> Result<Option<Tensor>> {
    let f32s = [logits, h, head]
        .iter()
        .all(|t| t.dtype() == candle_core::DType::F32);
    if !logits.device().is_cpu() || !f32s || targets.dtype() != candle_core::DType::U32 {
        return Ok(None);
    }
    let (n, v) = logits.dims2()?;
    let (hn, d) = h.dims2()?;
    if head.dims2()? != (d, v) || hn != n || targets.dims1()? != n {
        candle_core::bail!(
            "head-cross-entropy: logits {:?}, h {:?}, head {:?}, targets {:?} do not fit",
            logits.dims(),
            h.dims(),
            head.dims(),
            targets.dims()
        );
    }
    let targets = targets.to_vec1::<u32>()?;
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("head-cross-entropy: target {t} is outside the vocabulary of {v}");
    }
    let op = HeadLoss { targets };
    Ok(Some(logits.detach().contiguous()?.apply_op3(h, head, op)?))
}

/// `silu(gate) * up`, elementwise.
struct SwiGlu;

impl candle_core::CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gate, up) = (f32_slice("swiglu", s1, l1)?, f32_slice("swiglu", s2, l2)?);
        let mut out = par_zeros(gate.len());
        out.par_chunks_mut(4096)
            .zip(gate.par_chunks(4096).zip(up.par_chunks(4096)))
            .for_each(|(o, (g, u))| vmath::swiglu(o, g, u));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // d/dgate = g * up * s * (1 + gate * (1 - s)); d/dup = g * gate * s; s = sigmoid(gate).
        let both = gate.contiguous()?.apply_op3_no_bwd(
            &up.contiguous()?,
            &grad.contiguous()?,
            &SwiGluBackward,
        )?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// Both gradients of [`SwiGlu`], stacked as `[2, ...]`.
struct SwiGluBackward;

impl candle_core::CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "swiglu-backward"
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
        let (gate, up, grad) = f32_slices3("swiglu-backward", (s1, l1), (s2, l2), (s3, l3))?;
        let n = gate.len();
        let mut out = par_zeros(2 * n);
        let (d_gate, d_up) = out.split_at_mut(n);
        d_gate
            .par_chunks_mut(4096)
            .zip(d_up.par_chunks_mut(4096))
            .zip(gate.par_chunks(4096).zip(up.par_chunks(4096)))
            .zip(grad.par_chunks(4096))
            .for_each(|(((dg, du), (g, u)), gr)| vmath::swiglu_backward(dg, du, g, u, gr));
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// Whether the fused kernels [`swiglu`], [`rms_norm`] and [`heads`] (through
/// [`RopeTables::new`]) run for this tensor: on the CPU, in f32.
fn fused_applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// `silu(gate) * up`, fused on CPU for f32 and differentiable in both; `None` where the fused
/// kernel does not apply.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    if !fused_applies(gate) || gate.shape() != up.shape() {
        return Ok(None);
    }
    Ok(Some(
        gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?,
    ))
}

/// RMSNorm over the last dimension, `x * w / sqrt(mean(x^2) + eps)`, in f32.
struct RmsNorm {
    eps: f32,
}

/// `1 / sqrt(mean(x^2) + eps)` of one row.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|v| v * v).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

impl candle_core::CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (
            f32_slice("rms-norm", s1, l1)?,
            f32_slice("rms-norm", s2, l2)?,
        );
        let h = w.len();
        let mut out = par_zeros(x.len());
        out.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .for_each(|(o, x)| {
                let r = inv_rms(x, self.eps);
                for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                    *o = x * r * w;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let both = x.contiguous()?.apply_op3_no_bwd(
            &w.contiguous()?,
            &grad.contiguous()?,
            &RmsNormBackward { eps: self.eps },
        )?;
        let rows = both.dim(0)? - 1;
        let dx = both.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = both.get(rows)?.reshape(h)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Both gradients of [`RmsNorm`] as `[rows + 1, H]`: `dx` rows, then `dw`.
/// With `r = 1 / rms(x)`, `n = x * r`: `dx = r * (g*w - n * mean(g*w*n))`, `dw = sum(g * n)`.
struct RmsNormBackward {
    eps: f32,
}

impl candle_core::CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms-norm-backward"
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
        let (x, w, grad) = f32_slices3("rms-norm-backward", (s1, l1), (s2, l2), (s3, l3))?;
        let h = w.len();
        let rows = x.len() / h;
        let mut out = vec![0f32; (rows + 1) * h];
        let (dx, dw) = out.split_at_mut(rows * h);
        dx.par_chunks_mut(h)
            .zip(x.par_chunks(h).zip(grad.par_chunks(h)))
            .for_each(|(dx, (x, g))| {
                let r = inv_rms(x, self.eps);
                let dot: f32 = (0..h).map(|i| g[i] * w[i] * x[i] * r).sum::<f32>() / h as f32;
                for i in 0..h {
                    dx[i] = r * (g[i] * w[i] - x[i] * r * dot);
                }
            });
        // dw: per-chunk partial sums over rows, then their sum.
        let partial = x
            .par_chunks(h * 64)
            .zip(grad.par_chunks(h * 64))
            .map(|(x, g)| {
                let mut acc = vec![0f32; h];
                for (x, g) in x.chunks(h).zip(g.chunks(h)) {
                    let r = inv_rms(x, self.eps);
                    for i in 0..h {
                        acc[i] += g[i] * x[i] * r;
                    }
                }
                acc
            })
            .reduce(
                || vec![0f32; h],
                |mut a, b| {
                    for (a, b) in a.iter_mut().zip(b) {
                        *a += b;
                    }
                    a
                },
            );
        dw.copy_from_slice(&partial);
        Ok((CpuStorage::F32(out), Shape::from((rows + 1, h))))
    }
}

/// RMSNorm over the last dimension, fused on CPU for f32 and differentiable in `x` and
/// `weight`; `None` where the fused kernel does not apply.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !fused_applies(x)
        || weight.dtype() != x.dtype()
        || x.dims().last() != Some(&weight.elem_count())
    {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op2(
        &weight.contiguous()?,
        RmsNorm { eps: eps as f32 },
    )?))
}

/// RoPE tables `[T, D/2]` as plain vectors, made once per forward pass for the [`heads`] op.
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
}

impl RopeTables {
    /// From the `[T, D/2]` tensors of [`crate::rope::tables`]; `None` where the fused kernels do
    /// not apply (not on the CPU, not f32).
    pub fn new(cos: &Tensor, sin: &Tensor) -> Result<Option<Self>> {
        if !fused_applies(cos) {
            return Ok(None);
        }
        let table = |t: &Tensor| -> Result<Arc<Vec<f32>>> {
            Ok(Arc::new(t.flatten_all()?.to_vec1::<f32>()?))
        };
        Ok(Some(RopeTables {
            cos: table(cos)?,
            sin: table(sin)?,
        }))
    }
}

/// RoPE of one head vector in place (non-interleaved halves), rotating by the angle (`sign` 1)
/// or by its opposite (`sign` -1, the backward pass): `y1 = x1 cos - x2 sin`,
/// `y2 = x2 cos + x1 sin`.
fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32], sign: f32) {
    let half = cos.len();
    for i in 0..half {
        let (x1, x2, s) = (x[i], x[i + half], sign * sin[i]);
        x[i] = x1 * cos[i] - x2 * s;
        x[i + half] = x2 * cos[i] + x1 * s;
    }
}

/// `x * scale`, as candle's affine map computes it (`x * scale + 0`), so that the bits are
/// those of the composition.
fn scale_in_place(x: &mut [f32], scale: f32) {
    for v in x {
        *v = *v * scale + 0.0;
    }
}

/// The heads of a projection: rows `[B*T, n*hd]` (position-major, as a linear layer makes them)
/// to `[B, n, T, hd]` (head-major, as attention reads them), each head vector rotated by RoPE
/// and scaled where asked, in one pass. The composition is a transposed copy, RoPE and a
/// scaling, three passes over the tensor forward and three backward.
struct Heads {
    batch: usize,
    len: usize,
    heads: usize,
    dim: usize,
    rope: Option<RopeTables>,
    scale: Option<f32>,
}

impl Heads {
    /// The tables of position `p`.
    fn tables(&self, p: usize) -> Option<(&[f32], &[f32])> {
        let half = self.dim / 2;
        self.rope.as_ref().map(|r| {
            (
                &r.cos[p * half..(p + 1) * half],
                &r.sin[p * half..(p + 1) * half],
            )
        })
    }

    /// Head vector `x` of position `p` into `o`: rotated, then scaled.
    fn forward_one(&self, o: &mut [f32], x: &[f32], p: usize) {
        o.copy_from_slice(x);
        if let Some((c, s)) = self.tables(p) {
            rotate(o, c, s, 1.0);
        }
        if let Some(scale) = self.scale {
            scale_in_place(o, scale);
        }
    }

    /// The gradient `g` of one head vector into `o`: scaled, then rotated back (the
    /// composition's order).
    fn backward_one(&self, o: &mut [f32], g: &[f32], p: usize) {
        o.copy_from_slice(g);
        if let Some(scale) = self.scale {
            scale_in_place(o, scale);
        }
        if let Some((c, s)) = self.tables(p) {
            rotate(o, c, s, -1.0);
        }
    }

    fn check(&self, op: &str, n: usize) -> Result<()> {
        let (b, t, h, d) = (self.batch, self.len, self.heads, self.dim);
        if n != b * t * h * d {
            candle_core::bail!("{op}: {n} elements, expected {b} x {t} x {h} x {d}");
        }
        if let Some(r) = &self.rope {
            if d % 2 != 0 || r.cos.len() < t * (d / 2) || r.sin.len() != r.cos.len() {
                candle_core::bail!(
                    "{op}: RoPE tables of {} values for {t} positions of head size {d}",
                    r.cos.len()
                );
            }
        }
        Ok(())
    }
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        "heads"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice("heads", storage, layout)?;
        self.check("heads", x.len())?;
        let (t, n, d) = (self.len, self.heads, self.dim);
        let mut out = par_zeros(x.len());
        // One (batch row, head) pair per task: its `[T, hd]` output is contiguous.
        out.par_chunks_mut(t * d).enumerate().for_each(|(pair, o)| {
            let (b, h) = (pair / n, pair % n);
            for p in 0..t {
                let at = ((b * t + p) * n + h) * d;
                self.forward_one(&mut o[p * d..(p + 1) * d], &x[at..at + d], p);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((self.batch, n, t, d))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = HeadsBackward(Heads {
            rope: self.rope.clone(),
            ..*self
        });
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// The gradient of [`Heads`]: `[B, n, T, hd]` back to rows `[B*T, n*hd]`.
struct HeadsBackward(Heads);

impl CustomOp1 for HeadsBackward {
    fn name(&self) -> &'static str {
        "heads-backward"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = &self.0;
        let g = f32_slice("heads-backward", storage, layout)?;
        op.check("heads-backward", g.len())?;
        let (t, n, d) = (op.len, op.heads, op.dim);
        let mut out = par_zeros(g.len());
        // One row (batch row, position) per task: its `[n * hd]` output is contiguous.
        out.par_chunks_mut(n * d).enumerate().for_each(|(row, o)| {
            let (b, p) = (row / t, row % t);
            for h in 0..n {
                let at = ((b * n + h) * t + p) * d;
                op.backward_one(&mut o[h * d..(h + 1) * d], &g[at..at + d], p);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((op.batch * t, n * d))))
    }
}

/// The heads of a projection `x: [B*T, n*hd]` as `[B, n, T, hd]`, rotated by RoPE where `rope`
/// is given and multiplied by `scale` where given (after the rotation), in one pass, on CPU for
/// f32 (where [`RopeTables::new`] gives tables), differentiable in `x`.
pub fn heads(
    x: &Tensor,
    (batch, len, heads, dim): (usize, usize, usize, usize),
    rope: Option<&RopeTables>,
    scale: Option<f64>,
) -> Result<Tensor> {
    let op = Heads {
        batch,
        len,
        heads,
        dim,
        rope: rope.cloned(),
        // As candle's `Tensor * f64` rounds its factor.
        scale: scale.map(|s| s as f32),
    };
    x.contiguous()?.apply_op1(op)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var, D};

    /// Deterministic values in about [-2, 2).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                ((i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97)) % 4001) as f32 / 1000.0
                    - 2.0
            })
            .collect()
    }

    fn var(n: usize, shape: &[usize], seed: u32) -> Var {
        Var::from_tensor(&Tensor::from_vec(values(n, seed), shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// `sum(f(args) * probe)`: a scalar whose gradient reaches every output element.
    fn objective(out: &Tensor, probe: &Tensor) -> Tensor {
        (out * probe).unwrap().sum_all().unwrap()
    }

    /// Checks a fused op against its composition of plain ops (same values, same gradients)
    /// and its gradients against central finite differences of the fused forward.
    fn check(
        args: &[Var],
        fused: &dyn Fn(&[Tensor]) -> Tensor,
        plain: &dyn Fn(&[Tensor]) -> Tensor,
    ) {
        let ts: Vec<Tensor> = args.iter().map(|v| v.as_tensor().clone()).collect();
        let out = fused(&ts);
        let probe =
            Tensor::from_vec(values(out.elem_count(), 7), out.shape(), &Device::Cpu).unwrap();
        let reference = plain(&ts);
        let diff = (&out - &reference)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5, "forward differs");
        let g_fused = objective(&out, &probe).backward().unwrap();
        let g_plain = objective(&reference, &probe).backward().unwrap();
        for (k, v) in args.iter().enumerate() {
            let a = g_fused
                .get(v)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b = g_plain
                .get(v)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "arg {k}[{i}]: fused {a}, plain {b}"
                );
            }
            // Finite differences (f64 accumulation of the f32 forward), on a few elements.
            let base = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for i in (0..base.len()).step_by((base.len() / 5).max(1)) {
                let eps = 1e-2f32;
                let at = |delta: f32| -> f64 {
                    let mut x = base.clone();
                    x[i] += delta;
                    let mut moved = ts.clone();
                    moved[k] = Tensor::from_vec(x, v.shape(), &Device::Cpu).unwrap();
                    let out = fused(&moved)
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    let p = probe.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    out.iter().zip(&p).map(|(o, p)| *o as f64 * *p as f64).sum()
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                let g = a[i] as f64;
                assert!(
                    (fd - g).abs() <= 2e-2 * (1.0 + g.abs()),
                    "arg {k}[{i}]: finite difference {fd}, gradient {g}"
                );
            }
        }
    }

    #[test]
    fn swiglu_matches_its_composition_and_finite_differences() {
        let args = [var(6 * 40, &[6, 40], 1), var(6 * 40, &[6, 40], 2)];
        check(
            &args,
            &|t| super::swiglu(&t[0], &t[1]).unwrap().unwrap(),
            &|t| {
                let s = (t[0].neg().unwrap().exp().unwrap() + 1.0)
                    .unwrap()
                    .recip()
                    .unwrap();
                ((&t[0] * s).unwrap() * &t[1]).unwrap()
            },
        );
    }

    /// The additive mask `[T, T]` of causal attention: 0 where query i sees key j, -inf elsewhere.
    fn causal_mask(t: usize, window: Option<usize>) -> Tensor {
        let mask: Vec<f32> = (0..t * t)
            .map(|n| {
                let (i, j) = (n / t, n % t);
                let seen = j <= i && window.is_none_or(|w| i - j < w);
                if seen {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap()
    }

    /// Softmax over the last dimension of `x + mask`, composed of tensor ops.
    fn masked_softmax(x: &Tensor, mask: &Tensor) -> Tensor {
        let m = x.broadcast_add(mask).unwrap();
        let max = m.max_keepdim(D::Minus1).unwrap();
        let e = m.broadcast_sub(&max).unwrap().exp().unwrap();
        e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
    }

    #[test]
    fn causal_softmax_matches_its_composition_and_finite_differences() {
        let t = 37; // more keys than one row of vector lanes, and a tail
        for window in [None, Some(5)] {
            let args = [var(2 * t * t, &[2, t, t], 6)];
            let mask = causal_mask(t, window);
            check(
                &args,
                &|x| super::causal_softmax(&x[0], window).unwrap().unwrap(),
                &|x| masked_softmax(&x[0], &mask),
            );
        }
    }

    #[test]
    fn causal_attention_matches_its_composition_and_finite_differences() {
        // More queries than one block, not a multiple of it; windows inside and across blocks.
        let (b, h, t, d) = (2, 2, 70, 8);
        for window in [None, Some(5), Some(66)] {
            let n = b * h * t * d;
            let args = [
                var(n, &[b, h, t, d], 11),
                var(n, &[b, h, t, d], 12),
                var(n, &[b, h, t, d], 13),
            ];
            let mask = causal_mask(t, window);
            check(
                &args,
                &|x| {
                    crate::attention::causal_attention(&x[0], &x[1], &x[2], window)
                        .unwrap()
                        .unwrap()
                },
                &|x| {
                    let s = x[0].matmul(&x[1].t().unwrap()).unwrap();
                    masked_softmax(&s, &mask).matmul(&x[2]).unwrap()
                },
            );
        }
    }

    /// `-log_softmax(logits)[target]` per row, as plain tensor ops.
    fn plain_row_loss(logits: &Tensor, targets: &Tensor) -> Tensor {
        let max = logits.max_keepdim(D::Minus1).unwrap();
        let shifted = logits.broadcast_sub(&max).unwrap();
        let lse = shifted
            .exp()
            .unwrap()
            .sum_keepdim(D::Minus1)
            .unwrap()
            .log()
            .unwrap();
        let logp = shifted.broadcast_sub(&lse).unwrap();
        let picked = logp.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap();
        picked.squeeze(1).unwrap().neg().unwrap()
    }

    fn head_targets(n: usize, v: usize) -> Tensor {
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        Tensor::from_vec(targets, n, &Device::Cpu).unwrap()
    }

    fn fused_head_loss(x: &[Tensor], targets: &Tensor) -> Tensor {
        let logits = x[0].matmul(&x[1]).unwrap();
        super::head_cross_entropy(&logits, &x[0], &x[1], targets)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn head_cross_entropy_matches_its_composition_and_finite_differences() {
        let (n, d, v) = (6, 5, 45);
        let args = [var(n * d, &[n, d], 8), var(d * v, &[d, v], 9)];
        let targets = head_targets(n, v);
        check(&args, &|x| fused_head_loss(x, &targets), &|x| {
            plain_row_loss(&x[0].matmul(&x[1]).unwrap(), &targets)
        });
    }

    /// Rows whose loss gets no gradient are left out of the backward pass: the gradients are
    /// still the composition's, with every row, with some, and with none selected.
    #[test]
    fn head_cross_entropy_backward_skips_unselected_rows() {
        let (n, d, v) = (9, 7, 33);
        let args = [var(n * d, &[n, d], 3), var(d * v, &[d, v], 4)];
        let targets = head_targets(n, v);
        let ts: Vec<Tensor> = args.iter().map(|a| a.as_tensor().clone()).collect();
        let fused = fused_head_loss(&ts, &targets);
        let plain = plain_row_loss(&ts[0].matmul(&ts[1]).unwrap(), &targets);
        let masks: [Vec<f32>; 3] = [
            vec![1.0; n],
            (0..n)
                .map(|i| f32::from(u8::from(i % 3 == 1)) * 0.7)
                .collect(),
            vec![0.0; n],
        ];
        for mask in masks {
            let m = Tensor::from_vec(mask.clone(), n, &Device::Cpu).unwrap();
            let gf = objective(&fused, &m).backward().unwrap();
            let gp = objective(&plain, &m).backward().unwrap();
            for (k, a) in args.iter().enumerate() {
                let read = |g: Option<&Tensor>| match g {
                    Some(g) => g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    None => vec![0.0; a.as_tensor().elem_count()],
                };
                let (x, y) = (read(gf.get(a)), read(gp.get(a)));
                for (i, (x, y)) in x.iter().zip(&y).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                        "mask {mask:?}, arg {k}[{i}]: fused {x}, plain {y}"
                    );
                }
                if k == 0 {
                    // Unselected rows of `h` get exactly zero.
                    for (r, &w) in mask.iter().enumerate() {
                        if w == 0.0 {
                            assert!(x[r * d..(r + 1) * d].iter().all(|&g| g == 0.0));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn heads_match_their_composition_and_finite_differences() {
        let (b, t, n, d) = (2, 5, 3, 8);
        let angles: Vec<f32> = (0..t * d / 2).map(|i| i as f32 * 0.37).collect();
        let table = |f: fn(f32) -> f32| {
            let v: Vec<f32> = angles.iter().map(|&a| f(a)).collect();
            Tensor::from_vec(v, (t, d / 2), &Device::Cpu).unwrap()
        };
        let (cos, sin) = (table(f32::cos), table(f32::sin));
        let tables = super::RopeTables::new(&cos, &sin).unwrap().unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        for (rotate, scaled) in [(true, true), (true, false), (false, false), (false, true)] {
            let args = [var(b * t * n * d, &[b * t, n * d], 5)];
            let fused = |x: &[Tensor]| {
                let rope = rotate.then_some(&tables);
                super::heads(&x[0], (b, t, n, d), rope, scaled.then_some(scale)).unwrap()
            };
            // The composition as the model's other paths run it: a transposed copy, RoPE
            // (candle's kernel, or the plain tensor ops, which are differentiable), the scaling.
            let composed = |x: &Tensor, plain: bool| {
                let x = x.reshape((b, t, n, d)).unwrap().transpose(1, 2).unwrap();
                let x = x.contiguous().unwrap();
                let x = match (rotate, plain) {
                    (false, _) => x,
                    (true, true) => crate::rope::apply_plain(&x, &cos, &sin).unwrap(),
                    (true, false) => candle_nn::rotary_emb::rope(&x, &cos, &sin).unwrap(),
                };
                if scaled {
                    (x * scale).unwrap()
                } else {
                    x
                }
            };
            let bits = |t: &Tensor| -> Vec<u32> {
                let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v.iter().map(|x| x.to_bits()).collect()
            };
            let x = args[0].as_tensor();
            assert_eq!(
                bits(&fused(std::slice::from_ref(x))),
                bits(&composed(x, false))
            );
            assert_eq!(bits(&composed(x, false)), bits(&composed(x, true)));
            // The gradients too, bit for bit.
            let probe = Tensor::from_vec(values(b * t * n * d, 9), (b, n, t, d), &Device::Cpu);
            let probe = probe.unwrap();
            let grad = |out: Tensor| {
                let g = objective(&out, &probe).backward().unwrap();
                bits(g.get(x).unwrap())
            };
            assert_eq!(
                grad(fused(std::slice::from_ref(x))),
                grad(composed(x, true))
            );
            check(&args, &fused, &|x| composed(&x[0], true));
        }
    }

    #[test]
    fn rms_norm_matches_its_composition_and_finite_differences() {
        let args = [var(5 * 48, &[5, 48], 3), var(48, &[48], 4)];
        let eps = 1e-5;
        check(
            &args,
            &|t| super::rms_norm(&t[0], &t[1], eps).unwrap().unwrap(),
            &|t| {
                let var = t[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                let n = t[0]
                    .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
                    .unwrap();
                n.broadcast_mul(&t[1]).unwrap()
            },
        );
    }
}
