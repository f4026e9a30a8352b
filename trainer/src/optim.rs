//! AdamW with decoupled weight decay (Loshchilov & Hutter), its state saved and restored, and
//! the learning-rate schedule (linear warmup, then cosine decay to a floor).

use std::collections::HashMap;

use candle_core::{Tensor, Var};
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
        })
    }

    /// One update with learning rate `lr` and per-variable gradients (same order as the vars).
    pub fn step(&mut self, vars: &[(String, Var)], grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let c = &self.config;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, ((_, var), g)) in vars.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let p = var.as_tensor();
            let decayed = if p.rank() >= 2 && c.weight_decay > 0.0 {
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
        opt.step(&vars, std::slice::from_ref(&g), 0.1).unwrap();
        // p = 1 * (1 - 0.05) - 0.1 * 1 = 0.85 (the first Adam step is lr * sign(g))
        let p1 = var.as_tensor().to_vec2::<f32>().unwrap()[0][0];
        assert!((p1 - 0.85).abs() < 1e-6, "{p1}");
        opt.step(&vars, &[g], 0.1).unwrap();
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
}
