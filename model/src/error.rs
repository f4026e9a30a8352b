use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("model config: field `{field}`: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("checkpoint has no weight `{name}`")]
    MissingWeight { name: String },
    #[error("weight `{name}` has shape {got:?}, the config implies {expected:?}")]
    WeightShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("sequence of {len} tokens exceeds max_position_embeddings = {max}")]
    TooLong { len: usize, max: usize },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("{path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
