//! Model sizes for new checkpoints (`rho model init --preset`, the demo, the benchmarks):
//! Llama-shaped decoders, SwiGLU, RMSNorm, RoPE, untied embeddings.

use std::fmt;
use std::str::FromStr;

/// A model size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Preset {
    /// 2 layers, hidden 64, 4 heads (2 key-value heads): tests and the quick demo.
    Tiny,
    /// 4 layers, hidden 128, 4 heads: the demo.
    Small,
    /// 8 layers, hidden 384, 6 heads: about 20M parameters with a 32k vocabulary.
    M20,
    /// 8 layers, hidden 512, 8 heads, intermediate 1376: about 60M parameters with a 32k
    /// vocabulary (the second size of the trainer's speed comparison).
    M60,
    /// TinyLlama-1.1B's shape: 22 layers, hidden 2048, 32 heads (4 key-value heads),
    /// intermediate 5632; 1.1B parameters with a 32k vocabulary. Real-size memory and speed
    /// checks.
    B1,
}

impl Preset {
    /// Every preset, smallest first.
    pub const ALL: [Preset; 5] = [
        Preset::Tiny,
        Preset::Small,
        Preset::M20,
        Preset::M60,
        Preset::B1,
    ];

    /// The name the command line and configs use.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::M20 => "20m",
            Preset::M60 => "60m",
            Preset::B1 => "1b",
        }
    }

    /// `(hidden, layers, heads, key-value heads, intermediate)`.
    fn shape(self) -> (usize, usize, usize, usize, usize) {
        match self {
            Preset::Tiny => (64, 2, 4, 2, 172),
            Preset::Small => (128, 4, 4, 4, 344),
            Preset::M20 => (384, 8, 6, 6, 1024),
            Preset::M60 => (512, 8, 8, 8, 1376),
            Preset::B1 => (2048, 22, 32, 4, 5632),
        }
    }

    /// The `config.json` of this size for a vocabulary and a longest sequence.
    pub fn hf_config(self, vocab: usize, max_positions: usize) -> serde_json::Value {
        let (hidden, layers, heads, kv, inter) = self.shape();
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": hidden / heads,
            "hidden_act": "silu",
            "max_position_embeddings": max_positions,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": false,
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": "float32",
        })
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown preset `{s}` (tiny, small, 20m, 60m, 1b)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_from_its_name_and_makes_a_valid_config() {
        for p in Preset::ALL {
            assert_eq!(p.name().parse::<Preset>(), Ok(p));
            let config = p.hf_config(1000, 128).to_string();
            let c = crate::HfConfig::from_json(&config)
                .unwrap()
                .into_config()
                .unwrap();
            assert_eq!((c.vocab_size, c.max_position_embeddings), (1000, 128));
        }
        assert!("huge"
            .parse::<Preset>()
            .unwrap_err()
            .contains("tiny, small, 20m, 60m, 1b"));
    }
}
