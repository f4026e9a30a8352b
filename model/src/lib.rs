//! Decoder-only language models of the Llama family on candle (Llama / TinyLlama, Mistral,
//! Qwen2), HuggingFace checkpoint reading and writing, and exact per-token losses.
//!
//! The same weights serve a fused inference path (selectors) and a differentiable plain path
//! (the trainer); see [`ForwardMode`].

#![warn(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod attention;
pub mod checkpoint;
pub mod config;
mod device;
mod error;
pub mod fused;
pub mod init;
pub mod lanes;
pub mod loss;
pub mod model;
pub mod preset;
pub mod rope;
mod vmath;

pub use config::{Config, Family, HfConfig, RopeScaling};
pub use device::{parse_device, DTypeSpec, DeviceSpec};
pub use error::{ModelError, Result};
pub use loss::per_token_loss;
pub use model::{Attention, Block, DecoderLm, ForwardMode, Mlp};
pub use preset::Preset;
