//! AdamW with decoupled weight decay (Loshchilov & Hutter), its state saved and restored, and
//! the learning-rate schedule (linear warmup, then cosine decay to a floor).

use std::collections::HashMap;

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Result, TrainerError};

/// Optimizer and schedule settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Peak learning rate. Default 3e-4.
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// AdamW's first-moment decay. Default 0.9.
    #[serde(default = "d_beta1")]
    pub beta1: f64,
    /// AdamW's second-moment decay. Default 0.95.
    #[serde(default = "d_beta2")]
    pub beta2: f64,
    /// AdamW's denominator floor. Default 1e-8.
    #[serde(default = "d_eps")]
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices (2-D weights) only. Default 0.1.
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// Linear warmup steps. Default 0.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Steps of the cosine decay (warmup included); none: constant after warmup.
    #[serde(default)]
    pub decay_steps: Option<u64>,
    /// The learning rate at the end of the decay, as a fraction of `lr`. Default 0.1.
    #[serde(default = "d_min")]
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm to this; none: no clipping. Default 1.0.
    #[serde(default = "d_clip")]
    pub grad_clip: Option<f64>,
}

fn d_lr() -> f64 {
    3e-4
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.95
}
fn d_eps() -> f64 {
    1e-8
}
fn d_wd() -> f64 {
    0.1
}
fn d_min() -> f64 {
    0.1
}
fn d_clip() -> Option<f64> {
    Some(1.0)
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults parse")
    }
}

impl OptimizerConfig {
    /// The learning rate of step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let Some(total) = self.decay_steps else {
            return self.lr;
        };
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        let floor = self.lr * self.min_lr_ratio;
        floor + (self.lr - floor) * cosine
    }
}

/// AdamW over named variables.
pub struct AdamW {
    config: OptimizerConfig,
    /// Updates taken (the bias-correction step count).
    pub t: u64,
    names: Vec<String>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Whether CPU f32 variables take the fused update (always, but for the test that compares
    /// it with the tensor-op path).
    fused: bool,
}

impl AdamW {
    /// An optimizer over `vars`, with zeroed moments.
    pub fn new(config: OptimizerConfig, vars: &[(String, Var)]) -> Result<Self> {
        let mut m = Vec::with_capacity(vars.len());
        let mut v = Vec::with_capacity(vars.len());
        for (_, var) in vars {
            m.push(var.as_tensor().zeros_like()?);
            v.push(var.as_tensor().zeros_like()?);
        }
        Ok(AdamW {
            config,
            t: 0,
            names: vars.iter().map(|(n, _)| n.clone()).collect(),
            m,
            v,
            fused: true,
        })
    }

    /// One update with learning rate `lr` and per-variable gradients (same order as the vars),
    /// each gradient multiplied by `grad_scale` first where given (gradient clipping).
    ///
    /// Contiguous f32 variables on the CPU take one fused pass per variable, parallel over
    /// chunks, that reads the gradient and both moments once and updates the variable in place;
    /// it does the same f32 operations in the same order as the tensor-op path that every other
    /// variable takes, so the two give the same bits (checked by a test).
    pub fn step(
        &mut self,
        vars: &[(String, Var)],
        grads: &[Tensor],
        lr: f64,
        grad_scale: Option<f64>,
    ) -> Result<()> {
        self.t += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, ((_, var), g)) in vars.iter().zip(grads).enumerate() {
            let p = var.as_tensor();
            let decay = p.rank() >= 2 && c.weight_decay > 0.0;
            if self.fused {
                let k = Scalars::new(&c, bc1, bc2, lr, grad_scale, decay);
                if let Some((m, v)) = fused_step(p, g, &self.m[i], &self.v[i], k)? {
                    self.m[i] = m;
                    self.v[i] = v;
                    continue;
                }
            }
            let scaled;
            let g = match grad_scale {
                Some(s) => {
                    scaled = (g * s)?;
                    &scaled
                }
                None => g,
            };
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let decayed = if decay {
                (p * (1.0 - lr * c.weight_decay))?
            } else {
                p.clone()
            };
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments as named tensors (`<name>.exp_avg`, `<name>.exp_avg_sq`), for a checkpoint.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, n) in self.names.iter().enumerate() {
            out.insert(format!("{n}.exp_avg"), self.m[i].clone());
            out.insert(format!("{n}.exp_avg_sq"), self.v[i].clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`] (read from the file `from`, which an error
    /// names) and the step count.
    pub fn load_state(
        &mut self,
        state: &HashMap<String, Tensor>,
        t: u64,
        from: &std::path::Path,
    ) -> Result<()> {
        for (i, n) in self.names.iter().enumerate() {
            for (key, slot) in [
                (format!("{n}.exp_avg"), &mut self.m[i]),
                (format!("{n}.exp_avg_sq"), &mut self.v[i]),
            ] {
                let t = state
                    .get(&key)
                    .ok_or_else(|| TrainerError::checkpoint(from, format!("lacks `{key}`")))?;
                if t.dims() != slot.dims() {
                    return Err(TrainerError::checkpoint(
                        from,
                        format!(
                            "`{key}` has shape {:?}, expected {:?}",
                            t.dims(),
                            slot.dims()
                        ),
                    ));
                }
                *slot = t.clone();
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Elements per parallel task of the fused step.
const CHUNK: usize = 1 << 15;

/// The fused AdamW update of one variable: `p` in place, the new moments returned. `None` (and
/// nothing changed) where the tensors are not contiguous f32 on the CPU.
///
/// Each line mirrors one tensor op of [`AdamW::step`]'s other path: `x * a` on a tensor is
/// `affine(a, 0)`, which computes `x * (a as f32) + 0` in f32 (the `+ 0.0` is kept: it turns a
/// `-0.0` into `0.0`, as the tensor op does), `x / a` is `affine(1 / a, 0)`, `x + a` is
/// `affine(1, a)`.
fn fused_step(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    k: Scalars,
) -> Result<Option<(Tensor, Tensor)>> {
    let cpu_f32 = |t: &Tensor| {
        t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous() && t.dims() == p.dims()
    };
    if ![p, g, m, v].into_iter().all(cpu_f32) {
        return Ok(None);
    }
    let op = FusedAdamW {
        g: g.clone(),
        k,
        moments: std::sync::Mutex::new(None),
    };
    p.inplace_op3(m, v, &op)?;
    let (m, v) = op
        .moments
        .into_inner()
        .map_err(|_| candle_core::Error::Msg("fused AdamW: a worker panicked".into()))?
        .ok_or_else(|| candle_core::Error::Msg("fused AdamW: no moments written".into()))?;
    Ok(Some((
        Tensor::from_vec(m, p.dims(), p.device())?,
        Tensor::from_vec(v, p.dims(), p.device())?,
    )))
}

/// The f32 scalars of one fused update.
#[derive(Clone, Copy)]
struct Scalars {
    scale: Option<f32>,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    inv_bc1: f32,
    inv_bc2: f32,
    eps: f32,
    decay: Option<f32>,
    lr: f32,
}

impl Scalars {
    /// The scalars of step `lr` with bias corrections `bc1`, `bc2`, rounded to f32 as the
    /// tensor path's `affine` rounds them; `decay`: whether this variable is decayed.
    fn new(
        c: &OptimizerConfig,
        bc1: f64,
        bc2: f64,
        lr: f64,
        grad_scale: Option<f64>,
        decay: bool,
    ) -> Self {
        Scalars {
            scale: grad_scale.map(|s| s as f32),
            beta1: c.beta1 as f32,
            one_minus_beta1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            inv_bc1: (1.0 / bc1) as f32,
            inv_bc2: (1.0 / bc2) as f32,
            eps: c.eps as f32,
            decay: decay.then_some((1.0 - lr * c.weight_decay) as f32),
            lr: lr as f32,
        }
    }

    /// One element: `(p, g, m, v)` to `(p', m', v')`.
    #[inline(always)]
    fn update(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let g = match self.scale {
            Some(s) => g * s + 0.0,
            None => g,
        };
        let m = (m * self.beta1 + 0.0) + (g * self.one_minus_beta1 + 0.0);
        let v = (v * self.beta2 + 0.0) + ((g * g) * self.one_minus_beta2 + 0.0);
        let denom = (v * self.inv_bc2 + 0.0).sqrt() * 1.0 + self.eps;
        let update = (m * self.inv_bc1 + 0.0) / denom;
        let p = match self.decay {
            Some(d) => p * d + 0.0,
            None => p,
        };
        (p - (update * self.lr + 0.0), m, v)
    }
}

/// The in-place op behind [`fused_step`]: the variable is the mutated input, the moments the
/// other two; the gradient rides along, and the new moments come back through `moments`.
struct FusedAdamW {
    g: Tensor,
    k: Scalars,
    moments: std::sync::Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl candle_core::InplaceOp3 for FusedAdamW {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (g_storage, g_layout) = self.g.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(g)) = &*g_storage else {
            candle_core::bail!("fused AdamW: the gradient is not f32 on the CPU");
        };
        let (CpuStorage::F32(p), CpuStorage::F32(m), CpuStorage::F32(v)) = (s1, s2, s3) else {
            candle_core::bail!("fused AdamW: the variable and moments must be f32");
        };
        let span = |l: &Layout| {
            l.contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("fused AdamW: not contiguous".into()))
        };
        let (p_range, g_range, m_range, v_range) =
            (span(l1)?, span(g_layout)?, span(l2)?, span(l3)?);
        let p = &mut p[p_range.0..p_range.1];
        let g = &g[g_range.0..g_range.1];
        let m = &m[m_range.0..m_range.1];
        let v = &v[v_range.0..v_range.1];
        let n = p.len();
        if g.len() != n || m.len() != n || v.len() != n {
            candle_core::bail!("fused AdamW: sizes differ");
        }
        let mut m_out: Vec<f32> = Vec::with_capacity(n);
        let mut v_out: Vec<f32> = Vec::with_capacity(n);
        let k = self.k;
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .zip(
                m_out.spare_capacity_mut()[..n]
                    .par_chunks_mut(CHUNK)
                    .zip(v_out.spare_capacity_mut()[..n].par_chunks_mut(CHUNK)),
            )
            .for_each(|(((p, g), (m, v)), (mo, vo))| {
                for j in 0..p.len() {
                    let (pj, mj, vj) = k.update(p[j], g[j], m[j], v[j]);
                    p[j] = pj;
                    mo[j].write(mj);
                    vo[j].write(vj);
                }
            });
        #[allow(unsafe_code)]
        // SAFETY: the loop above wrote every one of the first `n` elements of both vectors
        // (the chunks of `[..n]` cover it exactly), and their capacity is `n`.
        unsafe {
            m_out.set_len(n);
            v_out.set_len(n);
        }
        *self
            .moments
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused AdamW: poisoned".into()))? =
            Some((m_out, v_out));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let c = OptimizerConfig {
            lr: 1.0,
            warmup_steps: 4,
            decay_steps: Some(14),
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        assert_eq!(c.lr_at(0), 0.25);
        assert_eq!(c.lr_at(3), 1.0);
        assert!((c.lr_at(4) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(9) - 0.55).abs() < 1e-12);
        assert!((c.lr_at(14) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(1000) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_the_reference_update() {
        // One parameter, two steps, worked by hand with the PyTorch AdamW formulas.
        let c = OptimizerConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.5,
            ..Default::default()
        };
        let var = Var::from_tensor(&Tensor::new(&[[1.0f32]], &Device::Cpu).unwrap()).unwrap();
        let vars = vec![("w".to_string(), var.clone())];
        let mut opt = AdamW::new(c, &vars).unwrap();
        let g = Tensor::new(&[[2.0f32]], &Device::Cpu).unwrap();
        opt.step(&vars, std::slice::from_ref(&g), 0.1, None)
            .unwrap();
        // p = 1 * (1 - 0.05) - 0.1 * 1 = 0.85 (the first Adam step is lr * sign(g))
        let p1 = var.as_tensor().to_vec2::<f32>().unwrap()[0][0];
        assert!((p1 - 0.85).abs() < 1e-6, "{p1}");
        opt.step(&vars, &[g], 0.1, None).unwrap();
        let p2 = var.as_tensor().to_vec2::<f32>().unwrap()[0][0];
        assert!((p2 - (0.85 * 0.95 - 0.1)).abs() < 1e-5, "{p2}");
        // State round-trips.
        let state = opt.state();
        let mut again = AdamW::new(c, &vars).unwrap();
        again
            .load_state(&state, opt.t, std::path::Path::new("optimizer.safetensors"))
            .unwrap();
        assert_eq!(again.t, 2);
    }
    #[test]
    fn the_fused_update_gives_the_bits_of_the_tensor_op_path() {
        // Sizes across chunk boundaries, a matrix (decayed) and a vector (not); gradients with
        // zeros, negative zeros and a wide range of magnitudes; steps with and without clipping.
        let c = OptimizerConfig::default();
        let shapes: [&[usize]; 3] = [&[3, CHUNK + 17], &[2 * CHUNK + 5], &[7]];
        let mut rng = rho_common::splitmix::SplitMix64::new(11);
        let mut uniform = move || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let make = |shape: &[usize], f: &mut dyn FnMut() -> f32| {
            let n: usize = shape.iter().product();
            Tensor::from_vec(
                (0..n).map(|_| f()).collect::<Vec<f32>>(),
                shape,
                &Device::Cpu,
            )
            .unwrap()
        };
        let params: Vec<Tensor> = shapes.iter().map(|s| make(s, &mut uniform)).collect();
        let vars = |ps: &[Tensor]| -> Vec<(String, Var)> {
            ps.iter()
                .enumerate()
                .map(|(i, p)| {
                    (
                        format!("p{i}"),
                        Var::from_tensor(&p.copy().unwrap()).unwrap(),
                    )
                })
                .collect()
        };
        let (fused_vars, plain_vars) = (vars(&params), vars(&params));
        let mut fused = AdamW::new(c, &fused_vars).unwrap();
        let mut plain = AdamW::new(c, &plain_vars).unwrap();
        plain.fused = false;
        for step in 0..4 {
            let grads: Vec<Tensor> = shapes
                .iter()
                .map(|s| {
                    let mut k = 0usize;
                    make(s, &mut || {
                        k += 1;
                        match k % 11 {
                            0 => 0.0,
                            1 => -0.0,
                            2 => uniform() * 1e-30,
                            _ => uniform() * 10f32.powi((k % 7) as i32 - 3),
                        }
                    })
                })
                .collect();
            let scale = (step % 2 == 1).then_some(0.37);
            let lr = 1e-3 * (step + 1) as f64;
            fused.step(&fused_vars, &grads, lr, scale).unwrap();
            plain.step(&plain_vars, &grads, lr, scale).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            };
            for i in 0..shapes.len() {
                assert_eq!(
                    bits(fused_vars[i].1.as_tensor()),
                    bits(plain_vars[i].1.as_tensor()),
                    "param {i}, step {step}"
                );
                assert_eq!(
                    bits(&fused.m[i]),
                    bits(&plain.m[i]),
                    "exp_avg {i}, step {step}"
                );
                assert_eq!(
                    bits(&fused.v[i]),
                    bits(&plain.v[i]),
                    "exp_avg_sq {i}, step {step}"
                );
            }
        }
    }
}
