//! Rotary position embeddings, computed as HuggingFace `transformers` does (f32 frequencies,
//! non-interleaved halves), for the default, linear and Llama 3 forms.

use candle_core::{DType, Device, Result, Tensor};

use crate::config::{Config, RopeScaling};

/// The inverse frequencies `1 / theta^(2i/d)`, adjusted by the scaling rule.
pub fn inv_freq(config: &Config) -> Vec<f32> {
    let d = config.head_dim;
    let base: Vec<f32> = (0..d)
        .step_by(2)
        .map(|i| 1.0 / (config.rope_theta as f32).powf(i as f32 / d as f32))
        .collect();
    match &config.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / *factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, low, high, old) = (
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
                *original_max_position_embeddings as f32,
            );
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen > low_wavelen {
                        f / factor
                    } else if wavelen < high_wavelen {
                        f
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// `cos` and `sin` tables of shape `[positions, head_dim / 2]`, computed in f32 and rounded to
/// `dtype` (the activations' dtype, as `transformers` does).
pub fn tables(
    config: &Config,
    positions: usize,
    device: &Device,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let inv = inv_freq(config);
    let half = inv.len();
    let mut freqs = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for f in &inv {
            freqs.push(p as f32 * f);
        }
    }
    let freqs = Tensor::from_vec(freqs, (positions, half), device)?;
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
}

/// Applies RoPE to `x: [B, H, T, D]` with plain tensor ops (differentiable):
/// `x * cos + rotate_half(x) * sin`, where `cos`, `sin` are `[T, D/2]`.
pub fn apply_plain(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(3)?;
    let cos = Tensor::cat(&[cos, cos], 1)?;
    let sin = Tensor::cat(&[sin, sin], 1)?;
    let x1 = x.narrow(3, 0, d / 2)?;
    let x2 = x.narrow(3, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
    x.broadcast_mul(&cos)?.add(&rotated.broadcast_mul(&sin)?)
}
