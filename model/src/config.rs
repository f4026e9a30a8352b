//! Model configuration in two steps, as candle does: [`HfConfig`] mirrors a HuggingFace
//! `config.json` (Llama / TinyLlama, Mistral, Qwen2, Qwen3), and [`HfConfig::into_config`] checks it and
//! turns it into the [`Config`] the model runs on.

use serde::Deserialize;

use crate::ModelError;

/// The fields of a HuggingFace `config.json` that the decoder needs. Unknown fields are ignored:
/// checkpoints carry many that do not change the forward pass.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    /// `llama`, `mistral`, `qwen2` or `qwen3` (default `llama`).
    #[serde(default)]
    pub model_type: Option<String>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden (model) width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); default: as many as query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Width of a head; default `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Older layout: top-level `rope_theta` and `rope_scaling`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE scaling (`linear`, `llama3`), as HuggingFace writes it.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Newer layout (transformers 5): `rope_parameters: {rope_theta, rope_type, ...}`.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Longest sequence.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// The LM head is the embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v and o (Llama, Qwen3); Qwen2 has q, k, v biases whatever this says.
    #[serde(default)]
    pub attention_bias: Option<bool>,
    /// Biases on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// The activation; only `silu` is supported.
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Sliding-window width (Mistral, Qwen2, Qwen3).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Whether Qwen2 or Qwen3 uses its sliding window.
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Qwen2, Qwen3: layers from this one on use the sliding window.
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// Per layer: `full_attention` or `sliding_attention`.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Kept as written.
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    /// Kept as written.
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

/// The architecture family, which decides the defaults a config leaves out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama, TinyLlama and their kin.
    Llama,
    /// Mistral.
    Mistral,
    /// Qwen2.
    Qwen2,
    /// Qwen3: Qwen2's layout without q/k/v biases, with an RMSNorm over each head of the
    /// queries and keys before RoPE.
    Qwen3,
}

/// How rotary frequencies are adjusted for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// No scaling.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// Positions are divided by this.
        factor: f64,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        /// Positions are divided by this.
        factor: f64,
        /// Llama 3: wavelengths above `original / low_freq_factor` are scaled fully.
        low_freq_factor: f64,
        /// Llama 3: wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Llama 3: the context the model was trained at.
        original_max_position_embeddings: f64,
    },
}

/// The validated configuration the model runs on.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The architecture family.
    pub family: Family,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Longest sequence.
    pub max_position_embeddings: usize,
    /// The LM head is the embedding.
    pub tie_word_embeddings: bool,
    /// Biases on the q, k, v projections (Qwen2).
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
    /// Per layer: `Some(w)` when the layer attends only to the last `w` positions.
    pub sliding_window: Vec<Option<usize>>,
    /// An RMSNorm (weights of `head_dim`) over each head of the queries and of the keys, after
    /// their projections and before RoPE (Qwen3's `q_norm`, `k_norm`).
    pub qk_norm: bool,
}

impl Config {
    /// The weights a token meets in a matrix product: every projection of every layer and the
    /// LM head (counted once when it is the embedding). The embedding lookup, norms and biases
    /// are left out. The `N` of "6N FLOPs per trained token, 2N per scored token".
    pub fn matmul_parameters(&self) -> usize {
        let h = self.hidden_size;
        let attention = h * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads);
        let mlp = 3 * h * self.intermediate_size;
        self.num_layers * (attention + mlp) + self.vocab_size * h
    }
}

fn bad(field: &'static str, reason: impl Into<String>) -> ModelError {
    ModelError::Config {
        field,
        reason: reason.into(),
    }
}

fn num(v: &serde_json::Value, key: &str) -> Option<f64> {
    v.get(key).and_then(serde_json::Value::as_f64)
}

impl HfConfig {
    /// Parses a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        serde_json::from_str(text).map_err(|e| bad("config.json", e.to_string()))
    }

    /// Validates and resolves defaults.
    pub fn into_config(self) -> Result<Config, ModelError> {
        let family = match self.model_type.as_deref() {
            Some("llama") | None => Family::Llama,
            Some("mistral") => Family::Mistral,
            Some("qwen2") => Family::Qwen2,
            Some("qwen3") => Family::Qwen3,
            Some(other) => {
                return Err(bad(
                    "model_type",
                    format!("`{other}` is not supported (llama, mistral, qwen2, qwen3)"),
                ))
            }
        };
        if let Some(act) = self.hidden_act.as_deref() {
            if act != "silu" {
                return Err(bad(
                    "hidden_act",
                    format!("`{act}` is not supported (silu)"),
                ));
            }
        }
        if self.num_attention_heads == 0 {
            return Err(bad("num_attention_heads", "must be positive"));
        }
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if num_kv_heads == 0 || !self.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "{num_kv_heads} does not divide num_attention_heads = {}",
                    self.num_attention_heads
                ),
            ));
        }
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(bad(
                "head_dim",
                format!("{head_dim} must be even and positive"),
            ));
        }
        // RoPE: the newer `rope_parameters` object wins over the older top-level fields.
        let (theta, scaling) = match &self.rope_parameters {
            Some(p) => (num(p, "rope_theta"), Some(p.clone())),
            None => (self.rope_theta, self.rope_scaling.clone()),
        };
        let rope_theta = theta.or(self.rope_theta).unwrap_or(10_000.0);
        let rope_scaling = parse_scaling(scaling.as_ref())?;
        let sliding_window = (0..self.num_hidden_layers)
            .map(|i| self.layer_window(family, i))
            .collect();
        Ok(Config {
            family,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: self.attention_bias.unwrap_or(family == Family::Qwen2),
            o_bias: self.attention_bias.unwrap_or(false) && family != Family::Qwen2,
            mlp_bias: self.mlp_bias,
            sliding_window,
            qk_norm: family == Family::Qwen3,
        })
    }

    fn layer_window(&self, family: Family, layer: usize) -> Option<usize> {
        let window = self.sliding_window?;
        if let Some(types) = &self.layer_types {
            return (types.get(layer).map(String::as_str) == Some("sliding_attention"))
                .then_some(window);
        }
        match family {
            Family::Mistral => Some(window),
            Family::Qwen2 | Family::Qwen3 => (self.use_sliding_window == Some(true)
                && layer >= self.max_window_layers.unwrap_or(0))
            .then_some(window),
            Family::Llama => None,
        }
    }
}

fn parse_scaling(v: Option<&serde_json::Value>) -> Result<RopeScaling, ModelError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(serde_json::Value::as_str)
        .unwrap_or("default");
    let factor = || num(v, "factor").ok_or_else(|| bad("rope_scaling", "`factor` is missing"));
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: num(v, "low_freq_factor").unwrap_or(1.0),
            high_freq_factor: num(v, "high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: num(v, "original_max_position_embeddings")
                .unwrap_or(8192.0),
        },
        other => {
            return Err(bad(
                "rope_scaling",
                format!("rope type `{other}` is not supported (default, linear, llama3)"),
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_rope_layouts_are_read() {
        let new = r#"{"vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"rope_parameters":{"rope_theta":500000.0,"rope_type":"llama3",
            "factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;
        let old = r#"{"vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3",
            "factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;
        let a = HfConfig::from_json(new).unwrap().into_config().unwrap();
        let b = HfConfig::from_json(old).unwrap().into_config().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.rope_theta, 500000.0);
        assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        let tiny = r#"{"vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"rope_theta":10000.0,"rope_scaling":null}"#;
        let c = HfConfig::from_json(tiny).unwrap().into_config().unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::None);
    }

    #[test]
    fn families_and_windows() {
        let base = |extra: &str| {
            format!(
                r#"{{"vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":3,"num_attention_heads":2,"num_key_value_heads":1{extra}}}"#
            )
        };
        let m = HfConfig::from_json(&base(r#","model_type":"mistral","sliding_window":4"#))
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(m.sliding_window, vec![Some(4); 3]);
        let q = HfConfig::from_json(&base(
            r#","model_type":"qwen2","sliding_window":4,"use_sliding_window":false"#,
        ))
        .unwrap()
        .into_config()
        .unwrap();
        assert_eq!(q.sliding_window, vec![None; 3]);
        assert!(q.qkv_bias && !q.o_bias && !q.qk_norm);
        let q3 = HfConfig::from_json(&base(
            r#","model_type":"qwen3","sliding_window":4,"use_sliding_window":true,"max_window_layers":1"#,
        ))
        .unwrap()
        .into_config()
        .unwrap();
        assert_eq!(q3.sliding_window, vec![None, Some(4), Some(4)]);
        assert!(!q3.qkv_bias && !q3.o_bias && q3.qk_norm);
        let bad = HfConfig::from_json(&base(r#","model_type":"gpt2""#))
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(bad.to_string().contains("model_type") && bad.to_string().contains("qwen3"));
        let bad = HfConfig::from_json(&base(r#","rope_scaling":{"rope_type":"yarn","factor":2}"#))
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(bad.to_string().contains("rope_scaling"));
    }
}
