//! The decoder: embeddings, `num_layers` pre-norm blocks (grouped-query attention with RoPE,
//! optional sliding window, q/k/v biases and per-head q/k RMSNorm; SwiGLU MLP), a final RMSNorm
//! and the LM head.
//!
//! One set of weights serves two forward modes ([`ForwardMode`]): the fused mode uses candle's
//! fused kernels (`rms_norm`, `softmax_last_dim`, `rope`), which have no backward pass; the
//! differentiable mode uses only differentiable tensor ops, for training. On the CPU in f32 both
//! modes use rho's own fused kernels, which have backward passes (`fused.rs`; causal attention in
//! `attention.rs`, which multiplies each block of queries only with the keys it can see).
//!
//! The parts are candle's: [`DecoderLm`] holds [`Block`]s, each an [`Attention`] and an [`Mlp`]
//! between two RMSNorms.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, D};

use crate::config::Config;
use crate::{rope, ModelError, Result};

/// Which kernels a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardMode {
    /// Fused kernels: fastest, no gradients. For scoring.
    Fused,
    /// Differentiable tensor ops only. For training.
    Differentiable,
}

#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// `x: [N, in]` -> `[N, out]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Grouped-query self-attention with RoPE, causal, optionally within a sliding window.
#[derive(Debug, Clone)]
pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Per-head RMSNorm weights `[head_dim]` of the queries and the keys (Qwen3), applied
    /// before RoPE.
    qk_norm: Option<(Tensor, Tensor)>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// Attend to at most this many positions back (sliding window); `None`: all.
    window: Option<usize>,
}

/// The SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// One pre-norm decoder block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Debug, Clone)]
pub struct Block {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    mlp: Mlp,
}

/// What every block of one forward pass shares: the batch shape, the RoPE tables, the
/// attention masks (when the fused causal softmax does not apply) and the mode.
struct Pass<'a> {
    batch: usize,
    len: usize,
    cos: &'a Tensor,
    sin: &'a Tensor,
    /// The same tables for the fused [`crate::fused::heads`] op, where it applies.
    tables: Option<crate::fused::RopeTables>,
    masks: &'a HashMap<Option<usize>, Tensor>,
    eps: f64,
    mode: ForwardMode,
}

/// A decoder-only causal LM of the Llama family.
#[derive(Debug, Clone)]
pub struct DecoderLm {
    config: Config,
    embed: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    device: Device,
}

/// Takes named tensors out of a map, reporting the first missing one by name.
struct Weights<'a> {
    map: &'a HashMap<String, Tensor>,
    dtype: DType,
}

impl Weights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .map
            .get(name)
            .ok_or_else(|| ModelError::MissingWeight {
                name: name.to_string(),
            })?;
        if t.dims() != shape {
            return Err(ModelError::WeightShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        Ok(t.to_dtype(self.dtype)?)
    }

    fn linear(&self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        Ok(Linear {
            weight: self.get(&format!("{prefix}.weight"), &[out, inp])?,
            bias: if bias {
                Some(self.get(&format!("{prefix}.bias"), &[out])?)
            } else {
                None
            },
        })
    }
}

impl DecoderLm {
    /// Builds the model from HuggingFace-named tensors (`model.layers.0.self_attn.q_proj.weight`, ...).
    pub fn from_tensors(
        config: Config,
        map: &HashMap<String, Tensor>,
        dtype: DType,
    ) -> Result<Self> {
        let w = Weights { map, dtype };
        let (h, i, hd) = (
            config.hidden_size,
            config.intermediate_size,
            config.head_dim,
        );
        let (nh, nkv) = (config.num_heads, config.num_kv_heads);
        let embed = w.get("model.embed_tokens.weight", &[config.vocab_size, h])?;
        let device = embed.device().clone();
        let layers = (0..config.num_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                let proj =
                    |name: &str, out, inp, bias| w.linear(&format!("{p}.{name}"), out, inp, bias);
                let qkv_bias = config.qkv_bias;
                let attn = Attention {
                    q: proj("self_attn.q_proj", nh * hd, h, qkv_bias)?,
                    k: proj("self_attn.k_proj", nkv * hd, h, qkv_bias)?,
                    v: proj("self_attn.v_proj", nkv * hd, h, qkv_bias)?,
                    o: proj("self_attn.o_proj", h, nh * hd, config.o_bias)?,
                    qk_norm: match config.qk_norm {
                        true => Some((
                            w.get(&format!("{p}.self_attn.q_norm.weight"), &[hd])?,
                            w.get(&format!("{p}.self_attn.k_norm.weight"), &[hd])?,
                        )),
                        false => None,
                    },
                    num_heads: nh,
                    num_kv_heads: nkv,
                    head_dim: hd,
                    window: config.sliding_window.get(l).copied().flatten(),
                };
                let mlp = Mlp {
                    gate: proj("mlp.gate_proj", i, h, config.mlp_bias)?,
                    up: proj("mlp.up_proj", i, h, config.mlp_bias)?,
                    down: proj("mlp.down_proj", h, i, config.mlp_bias)?,
                };
                Ok(Block {
                    input_norm: w.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                    attn,
                    post_norm: w.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                    mlp,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = w.get("model.norm.weight", &[h])?;
        let lm_head = if config.tie_word_embeddings && !map.contains_key("lm_head.weight") {
            embed.clone()
        } else {
            w.get("lm_head.weight", &[config.vocab_size, h])?
        };
        Ok(DecoderLm {
            config,
            embed,
            layers,
            norm,
            lm_head,
            device,
        })
    }

    /// Its configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The device its weights are on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The LM head weight `[vocab, hidden]`.
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// Final hidden states `[B, T, hidden]` (after the last norm) for token ids `[B, T]`.
    pub fn hidden(&self, ids: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.config.max_position_embeddings {
            return Err(ModelError::TooLong {
                len: t,
                max: self.config.max_position_embeddings,
            });
        }
        let dtype = self.embed.dtype();
        let (cos, sin) = rope::tables(&self.config, t, &self.device, dtype)?;
        // Attention probabilities are computed in f32 on CPU (see `Attention::probs`), where the
        // fused causal softmax needs no mask tensors: build them only elsewhere.
        let masks = if crate::fused::causal_softmax_applies(&self.device, DType::F32) {
            HashMap::new()
        } else {
            self.masks(t)?
        };
        let pass = Pass {
            batch: b,
            len: t,
            cos: &cos,
            sin: &sin,
            tables: crate::fused::RopeTables::new(&cos, &sin)?,
            masks: &masks,
            eps: self.config.rms_norm_eps,
            mode,
        };
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?; // [B*T, H]
        for block in &self.layers {
            x = block.forward(&x, &pass)?;
        }
        let x = rms_norm(&x, &self.norm, pass.eps, mode)?;
        Ok(x.reshape((b, t, self.config.hidden_size))?)
    }

    /// Additive attention masks `[T, T]` (0 or -inf): one causal, and one per distinct window.
    fn masks(&self, t: usize) -> Result<HashMap<Option<usize>, Tensor>> {
        let mut out = HashMap::new();
        for w in self.layers.iter().map(|l| l.attn.window) {
            if out.contains_key(&w) {
                continue;
            }
            let mut m = vec![0f32; t * t];
            for i in 0..t {
                for j in 0..t {
                    let visible = j <= i && w.is_none_or(|w| i - j < w);
                    if !visible {
                        m[i * t + j] = f32::NEG_INFINITY;
                    }
                }
            }
            out.insert(w, Tensor::from_vec(m, (t, t), &self.device)?);
        }
        Ok(out)
    }
}

impl Block {
    /// `x: [B*T, hidden]` through the block.
    fn forward(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        let normed = rms_norm(x, &self.input_norm, pass.eps, pass.mode)?;
        let x = (x + self.attn.forward(&normed, pass)?)?;
        let normed = rms_norm(&x, &self.post_norm, pass.eps, pass.mode)?;
        Ok((&x + self.mlp.forward(&normed, pass.mode)?)?)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor, mode: ForwardMode) -> candle_core::Result<Tensor> {
        let gate = self.gate.forward(x)?;
        let up = self.up.forward(x)?;
        if let Some(h) = crate::fused::swiglu(&gate, &up)? {
            return self.down.forward(&h);
        }
        let act = match mode {
            ForwardMode::Fused => candle_nn::ops::silu(&gate)?,
            ForwardMode::Differentiable => (&gate * sigmoid_plain(&gate)?)?,
        };
        self.down.forward(&(act * up)?)
    }
}

impl Attention {
    /// `x: [B*T, hidden]` -> `[B*T, hidden]`.
    fn forward(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        let (b, t) = (pass.batch, pass.len);
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let scale = 1.0 / (hd as f64).sqrt();
        let (q, k, v) = (self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?);
        let (q, k) = match &self.qk_norm {
            Some((q_norm, k_norm)) => (
                head_norm(&q, q_norm, hd, pass)?,
                head_norm(&k, k_norm, hd, pass)?,
            ),
            None => (q, k),
        };
        let (q, k, v) = match &pass.tables {
            // One pass per projection: split into heads, rotate, and scale q (cheaper than
            // scaling the `T x T` scores).
            Some(tables) => {
                let split = |y: &Tensor, n: usize, rope, scale| {
                    crate::fused::heads(y, (b, t, n, hd), rope, scale)
                };
                (
                    split(&q, nh, Some(tables), Some(scale))?,
                    split(&k, nkv, Some(tables), None)?,
                    split(&v, nkv, None, None)?,
                )
            }
            None => self.heads_composed(q, k, v, pass, scale)?,
        };
        let groups = nh / nkv;
        let k = repeat_kv(k, groups)?;
        let v = repeat_kv(v, groups)?;
        let out = match crate::attention::causal_attention(&q, &k, &v, self.window)? {
            Some(out) => out,
            None => {
                let scores = q.matmul(&k.t()?)?;
                self.probs(&scores, pass)?.matmul(&v)?
            }
        }; // [B, nh, T, hd]
        let out = out.transpose(1, 2)?.reshape((b * t, nh * hd))?;
        Ok(self.o.forward(&out)?)
    }

    /// The heads of the projections `[B*T, n*hd]` as `[B, n, T, hd]`, rotated (q and k) and
    /// scaled (q), composed of tensor ops (where the fused op does not apply).
    fn heads_composed(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pass: &Pass,
        scale: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, hd) = (pass.batch, pass.len, self.head_dim);
        let heads = |y: Tensor, n: usize| -> candle_core::Result<Tensor> {
            y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = heads(q, self.num_heads)?;
        let k = heads(k, self.num_kv_heads)?;
        let v = heads(v, self.num_kv_heads)?;
        let (cos, sin) = (pass.cos, pass.sin);
        let (q, k) = match pass.mode {
            ForwardMode::Fused => (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            ),
            ForwardMode::Differentiable => (
                rope::apply_plain(&q, cos, sin)?,
                rope::apply_plain(&k, cos, sin)?,
            ),
        };
        Ok(((q * scale)?, k, v))
    }

    /// Attention probabilities from scores `[B, nh, T, T]`, in the scores' dtype. The softmax
    /// runs in f32 (as `transformers`' eager attention does in half precision), except with the
    /// fused kernel on a GPU, whose reduction accumulates in f32 on half-precision input.
    fn probs(&self, scores: &Tensor, pass: &Pass) -> Result<Tensor> {
        let dtype = scores.dtype();
        let mask = || {
            pass.masks.get(&self.window).ok_or(ModelError::Config {
                field: "masks",
                reason: "no attention mask was built for this device".into(),
            })
        };
        if pass.mode == ForwardMode::Fused && !scores.device().is_cpu() {
            let masked = scores.broadcast_add(&mask()?.to_dtype(dtype)?)?;
            return Ok(candle_nn::ops::softmax_last_dim(&masked)?);
        }
        let scores = scores.to_dtype(DType::F32)?;
        let probs = match crate::fused::causal_softmax(&scores, self.window)? {
            Some(p) => p,
            None => {
                let masked = scores.broadcast_add(mask()?)?;
                match pass.mode {
                    ForwardMode::Fused => candle_nn::ops::softmax_last_dim(&masked)?,
                    ForwardMode::Differentiable => softmax_plain(&masked)?,
                }
            }
        };
        Ok(probs.to_dtype(dtype)?)
    }
}

/// RMSNorm over each head of a projection `[B*T, n*hd]`, with weights `[hd]`; same shape out.
fn head_norm(y: &Tensor, weight: &Tensor, hd: usize, pass: &Pass) -> candle_core::Result<Tensor> {
    let (rows, width) = y.dims2()?;
    let heads = y.reshape((rows * (width / hd), hd))?;
    rms_norm(&heads, weight, pass.eps, pass.mode)?.reshape((rows, width))
}

fn repeat_kv(x: Tensor, groups: usize) -> candle_core::Result<Tensor> {
    if groups == 1 {
        return Ok(x);
    }
    let (b, n, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, n, groups, t, d))?
        .reshape((b, n * groups, t, d))
}

fn rms_norm(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    mode: ForwardMode,
) -> candle_core::Result<Tensor> {
    if let Some(y) = crate::fused::rms_norm(x, weight, eps)? {
        return Ok(y);
    }
    // On a GPU, candle's kernel accumulates in f32 whatever the dtype.
    if mode == ForwardMode::Fused && !x.device().is_cpu() {
        return candle_nn::ops::rms_norm(x, weight, eps as f32);
    }
    // As `transformers` does: normalized in f32, rounded to the weights' dtype, then scaled.
    // (candle's CPU kernel rounds the root mean square to the input's dtype first.)
    let x32 = x.to_dtype(DType::F32)?;
    let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.to_dtype(x.dtype())?.broadcast_mul(weight)
}

fn softmax_plain(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

fn sigmoid_plain(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

impl Module for DecoderLm {
    /// Logits `[B, T, vocab]` for every position, fused path.
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = self
            .hidden(ids, ForwardMode::Fused)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        hidden.broadcast_matmul(&self.lm_head.t()?)
    }
}
