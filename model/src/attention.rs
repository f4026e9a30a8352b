//! Causal attention as one fused CPU op (f32): `softmax(q k^T + mask) v` per batch row and head,
//! with its backward pass, computing only the blocks of the score matrix that a query can see.
//!
//! The composition of tensor ops multiplies every query with every key (`[T, T]` scores), then
//! masks out the half above the diagonal. Here the queries go in blocks of `BLOCK` (64): block
//! `i0..i1` is multiplied with keys `lo(i0)..i1` only (`lo` is where a sliding window starts, 0
//! without one), so the four products of the backward pass and the two of the forward pass do
//! about 56% of the work at 512 tokens, and the softmax and its backward read the visible keys
//! only. Batch rows and heads run in parallel on the rayon pool, each block product on one
//! thread with `gemm`, the library candle's CPU matmul uses.
//!
//! Where a backward pass can follow (an input tracks gradients), the probabilities are kept for
//! it (`[B, nh, T, T]`, as the composition keeps them), inside the op, which candle's graph holds
//! until the backward pass has run. Otherwise (a selector's scoring, evaluation) each batch row
//! and head works in a scratch of one block of rows, and nothing of `[T, T]` size is allocated.

use crate::fused::{causal_softmax_applies, f32_slice, f32_slices3, first_key};
use crate::vmath;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Queries per block.
const BLOCK: usize = 64;

/// A strided f32 matrix over a slice: element `(r, c)` at `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// Rows `r0..r1` of a row-major matrix with `cols` columns stored `stride` apart, from
    /// column `c0`.
    fn rows(data: &'a [f32], stride: usize, r0: usize, r1: usize, c0: usize, cols: usize) -> Self {
        Mat {
            data: &data[r0 * stride + c0..],
            rows: r1 - r0,
            cols,
            rs: stride,
            cs: 1,
        }
    }

    fn t(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Whether every element lies inside the slice.
    fn fits(&self, len: usize) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < len
    }
}

/// `dst (+)= a b`: `dst` is `a.rows x b.cols`, row-major with row stride `dst_rs`, from the start
/// of `dst`; added to when `accumulate`, overwritten otherwise. One thread.
fn gemm(dst: &mut [f32], dst_rs: usize, accumulate: bool, a: Mat, b: Mat) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert_eq!(b.rows, k, "inner dimensions");
    let out = Mat {
        data: dst,
        rows: m,
        cols: n,
        rs: dst_rs,
        cs: 1,
    };
    assert!(
        out.fits(dst.len()) && a.fits(a.data.len()) && b.fits(b.data.len()),
        "a block product reaches past its buffer"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: every element of the three matrices lies inside its slice (checked above); `dst`
    // is borrowed mutably, so it overlaps neither operand.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The blocks of queries `(i0, i1, k0)`: queries `i0..i1` see keys among `k0..i1`.
fn blocks(t: usize, window: Option<usize>) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..t)
        .step_by(BLOCK)
        .map(move |i0| (i0, (i0 + BLOCK).min(t), first_key(i0, window)))
}

/// The fused op: `q`, `k`, `v` of shape `[B, nh, T, hd]` (q already scaled) to the attention
/// output `[B, nh, T, hd]`.
struct CausalAttention {
    window: Option<usize>,
    /// Whether to keep the probabilities for a backward pass.
    keep: bool,
    /// The probabilities `[B, nh, T, T]` of the forward pass, for the backward pass.
    probs: Mutex<Option<Arc<Vec<f32>>>>,
}

fn dims4(op: &str, l: &Layout) -> Result<(usize, usize, usize)> {
    match l.dims() {
        &[b, h, t, d] => Ok((b * h, t, d)),
        d => candle_core::bail!("{op}: expected [B, nh, T, hd], got {d:?}"),
    }
}

impl candle_core::CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
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
        let op = "causal-attention";
        let (q, k, v) = f32_slices3(op, (s1, l1), (s2, l2), (s3, l3))?;
        let (pairs, t, d) = dims4(op, l1)?;
        if l2.dims() != l1.dims() || l3.dims() != l1.dims() {
            candle_core::bail!("{op}: q, k and v differ in shape");
        }
        let window = self.window;
        let mut out = vec![0f32; pairs * t * d];
        // One pair's attention; row `i - i0 + first` of `p` holds query i's probabilities over
        // all T keys (`first = i0` in the kept `[T, T]` map, 0 in a scratch of one block).
        let pair = |o: &mut [f32], p: &mut [f32], q: &[f32], k: &[f32], v: &[f32], kept: bool| {
            for (i0, i1, k0) in blocks(t, window) {
                let (nk, first) = (i1 - k0, if kept { i0 } else { 0 });
                let s = Mat::rows(q, d, i0, i1, 0, d);
                let keys_t = Mat::rows(k, d, k0, i1, 0, d).t();
                gemm(&mut p[first * t + k0..], t, false, s, keys_t);
                for i in i0..i1 {
                    let row = &mut p[(i - i0 + first) * t..(i - i0 + first + 1) * t];
                    let lo = first_key(i, window);
                    row[k0..lo].fill(0.0);
                    row[i + 1..i1].fill(0.0);
                    vmath::softmax_in_place(&mut row[lo..=i]);
                }
                let probs = Mat::rows(p, t, first, first + i1 - i0, k0, nk);
                gemm(
                    &mut o[i0 * d..],
                    d,
                    false,
                    probs,
                    Mat::rows(v, d, k0, i1, 0, d),
                );
            }
        };
        let (qd, kd, vd) = (
            q.par_chunks(t * d),
            k.par_chunks(t * d),
            v.par_chunks(t * d),
        );
        let outputs = out.par_chunks_mut(t * d).zip(qd.zip(kd).zip(vd));
        if self.keep {
            let mut probs = crate::fused::par_zeros(pairs * t * t);
            outputs
                .zip(probs.par_chunks_mut(t * t))
                .for_each(|((o, ((q, k), v)), p)| pair(o, p, q, k, v, true));
            if let Ok(mut slot) = self.probs.lock() {
                *slot = Some(Arc::new(probs));
            }
        } else {
            outputs.for_each_init(
                || vec![0f32; BLOCK.min(t) * t],
                |p, (o, ((q, k), v))| pair(o, p, q, k, v, false),
            );
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let probs = self
            .probs
            .lock()
            .ok()
            .and_then(|mut slot| slot.take())
            .ok_or_else(|| {
                candle_core::Error::Msg("causal-attention: backward without a forward".into())
            })?;
        let backward = AttentionBackward {
            window: self.window,
            probs,
        };
        let grads = Tensor::stack(&[q.contiguous()?, k.contiguous()?, v.contiguous()?], 0)?
            .apply_op2_no_bwd(&grad.contiguous()?, &backward)?;
        Ok((
            Some(grads.get(0)?),
            Some(grads.get(1)?),
            Some(grads.get(2)?),
        ))
    }
}

/// The gradients of [`CausalAttention`] in `q`, `k` and `v`, stacked as `[3, B, nh, T, hd]`,
/// from `[q, k, v]` stacked the same way and the gradient of the output.
struct AttentionBackward {
    window: Option<usize>,
    probs: Arc<Vec<f32>>,
}

impl candle_core::CustomOp2 for AttentionBackward {
    fn name(&self) -> &'static str {
        "causal-attention-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "causal-attention-backward";
        let (qkv, go) = (f32_slice(op, s1, l1)?, f32_slice(op, s2, l2)?);
        let (pairs, t, d) = dims4(op, l2)?;
        let n = pairs * t * d;
        if qkv.len() != 3 * n || self.probs.len() != pairs * t * t {
            candle_core::bail!("{op}: inputs do not match the forward pass");
        }
        let (q, k, v) = (&qkv[..n], &qkv[n..2 * n], &qkv[2 * n..]);
        let window = self.window;
        let mut grads = crate::fused::par_zeros(3 * n);
        let (dq, rest) = grads.split_at_mut(n);
        let (dk, dv) = rest.split_at_mut(n);
        let inputs = q
            .par_chunks(t * d)
            .zip(k.par_chunks(t * d))
            .zip(v.par_chunks(t * d))
            .zip(go.par_chunks(t * d).zip(self.probs.par_chunks(t * t)));
        dq.par_chunks_mut(t * d)
            .zip(dk.par_chunks_mut(t * d))
            .zip(dv.par_chunks_mut(t * d))
            .zip(inputs)
            .for_each_init(
                || vec![0f32; BLOCK.min(t) * t],
                |ds, (((dq, dk), dv), (((q, k), v), (go, p)))| {
                    for (i0, i1, k0) in blocks(t, window) {
                        let nk = i1 - k0;
                        let go_rows = Mat::rows(go, d, i0, i1, 0, d);
                        // dP = dO V^T over the block's keys.
                        gemm(ds, nk, false, go_rows, Mat::rows(v, d, k0, i1, 0, d).t());
                        // dS = P * (dP - sum(P * dP)) over each query's visible keys, 0 elsewhere.
                        for i in i0..i1 {
                            let row = &mut ds[(i - i0) * nk..(i - i0 + 1) * nk];
                            let lo = first_key(i, window) - k0;
                            let visible = lo..=i - k0;
                            let prow = &p[i * t + k0..i * t + i1];
                            let dot = vmath::dot(&prow[visible.clone()], &row[visible.clone()]);
                            row[..lo].fill(0.0);
                            row[i - k0 + 1..].fill(0.0);
                            for (g, &y) in row[visible.clone()].iter_mut().zip(&prow[visible]) {
                                *g = y * (*g - dot);
                            }
                        }
                        let ds_rows = Mat::rows(ds, nk, 0, i1 - i0, 0, nk);
                        // dQ = dS K; dK += dS^T Q; dV += P^T dO.
                        gemm(
                            &mut dq[i0 * d..],
                            d,
                            false,
                            ds_rows,
                            Mat::rows(k, d, k0, i1, 0, d),
                        );
                        let q_rows = Mat::rows(q, d, i0, i1, 0, d);
                        gemm(&mut dk[k0 * d..], d, true, ds_rows.t(), q_rows);
                        let p_rows = Mat::rows(p, t, i0, i1, k0, nk);
                        gemm(&mut dv[k0 * d..], d, true, p_rows.t(), go_rows);
                    }
                },
            );
        let mut dims = vec![3];
        dims.extend_from_slice(l2.dims());
        Ok((CpuStorage::F32(grads), Shape::from(dims)))
    }
}

/// `softmax(q k^T + causal mask) v` for `q`, `k`, `v` of shape `[B, nh, T, hd]` (the same
/// number of heads; `q` already scaled), each query seeing the keys up to its own position
/// (within the last `window` of them with a sliding window); differentiable. `None` where the
/// fused op does not apply (not CPU, not f32).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: Option<usize>,
) -> Result<Option<Tensor>> {
    // The same devices and dtypes as the fused softmax: the CPU, in f32.
    if !causal_softmax_applies(q.device(), q.dtype()) {
        return Ok(None);
    }
    let op = CausalAttention {
        window,
        keep: q.track_op() || k.track_op() || v.track_op(),
        probs: Mutex::new(None),
    };
    Ok(Some(q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        op,
    )?))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    #[test]
    fn the_forward_without_gradients_gives_the_bits_of_the_one_that_keeps_them() {
        let (b, h, t, d) = (1, 3, 150, 16);
        let make = |seed: u64| -> Tensor {
            let mut s = seed;
            let v: Vec<f32> = (0..b * h * t * d)
                .map(|_| {
                    s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
                })
                .collect();
            Tensor::from_vec(v, (b, h, t, d), &Device::Cpu).unwrap()
        };
        let (q, k, v) = (make(1), make(2), make(3));
        for window in [None, Some(70)] {
            let plain = super::causal_attention(&q, &k, &v, window)
                .unwrap()
                .unwrap();
            let tracked = Var::from_tensor(&q).unwrap();
            let kept = super::causal_attention(tracked.as_tensor(), &k, &v, window)
                .unwrap()
                .unwrap();
            let bits = |x: &Tensor| -> Vec<u32> {
                let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v.iter().map(|f| f.to_bits()).collect()
            };
            assert_eq!(bits(&plain), bits(&kept), "window {window:?}");
        }
    }
}
