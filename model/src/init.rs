//! Fresh weights for a config, initialized as HuggingFace does (normal(0, 0.02) for matrices
//! and embeddings, ones for norms, zeros for biases), from a seed.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::config::Config;
use crate::Result;

/// Named tensors of a freshly initialized model (HF names). Deterministic for a seed.
pub fn random_weights(
    config: &Config,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut rng = Normal::new(seed);
    let (h, i, hd) = (
        config.hidden_size,
        config.intermediate_size,
        config.head_dim,
    );
    let (nh, nkv, v) = (config.num_heads, config.num_kv_heads, config.vocab_size);
    let mut out = HashMap::new();
    let mut matrix =
        |name: String, rows: usize, cols: usize, out: &mut HashMap<String, Tensor>| -> Result<()> {
            let data: Vec<f32> = (0..rows * cols).map(|_| rng.sample() * 0.02).collect();
            out.insert(name, Tensor::from_vec(data, (rows, cols), device)?);
            Ok(())
        };
    let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, device);
    let zeros = |n: usize| Tensor::zeros(n, candle_core::DType::F32, device);
    matrix("model.embed_tokens.weight".into(), v, h, &mut out)?;
    for l in 0..config.num_layers {
        let p = format!("model.layers.{l}");
        for (name, rows, cols, bias) in [
            ("self_attn.q_proj", nh * hd, h, config.qkv_bias),
            ("self_attn.k_proj", nkv * hd, h, config.qkv_bias),
            ("self_attn.v_proj", nkv * hd, h, config.qkv_bias),
            ("self_attn.o_proj", h, nh * hd, config.o_bias),
            ("mlp.gate_proj", i, h, config.mlp_bias),
            ("mlp.up_proj", i, h, config.mlp_bias),
            ("mlp.down_proj", h, i, config.mlp_bias),
        ] {
            matrix(format!("{p}.{name}.weight"), rows, cols, &mut out)?;
            if bias {
                out.insert(format!("{p}.{name}.bias"), zeros(rows)?);
            }
        }
        if config.qk_norm {
            out.insert(format!("{p}.self_attn.q_norm.weight"), ones(hd)?);
            out.insert(format!("{p}.self_attn.k_norm.weight"), ones(hd)?);
        }
        out.insert(format!("{p}.input_layernorm.weight"), ones(h)?);
        out.insert(format!("{p}.post_attention_layernorm.weight"), ones(h)?);
    }
    out.insert("model.norm.weight".into(), ones(h)?);
    if !config.tie_word_embeddings {
        matrix("lm_head.weight".into(), v, h, &mut out)?;
    }
    Ok(out)
}

/// Standard normal samples from SplitMix64 and Box–Muller: stable across dependency versions.
struct Normal {
    state: u64,
    spare: Option<f32>,
}

impl Normal {
    fn new(seed: u64) -> Self {
        Normal {
            state: seed ^ 0x6A09_E667_F3BC_C909,
            spare: None,
        }
    }

    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn sample(&mut self) -> f32 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * t.sin()) as f32);
        (r * t.cos()) as f32
    }
}
