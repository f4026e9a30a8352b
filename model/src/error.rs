use std::path::PathBuf;
use thiserror::Error;

/// Why a model cannot be loaded or run.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A config field (of `config.json`, or a device or dtype) is wrong.
    #[error("model config: field `{field}`: {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint lacks a weight the config implies.
    #[error("checkpoint has no weight `{name}`")]
    MissingWeight {
        /// The weight's name.
        name: String,
    },
    /// A weight has another shape than the config implies.
    #[error("weight `{name}` has shape {got:?}, the config implies {expected:?}")]
    WeightShape {
        /// The weight's name.
        name: String,
        /// What was expected.
        expected: Vec<usize>,
        /// What arrived.
        got: Vec<usize>,
    },
    /// A sequence longer than the model holds.
    #[error("sequence of {len} tokens exceeds max_position_embeddings = {max}")]
    TooLong {
        /// The sequence's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        /// The token id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A checkpoint file that cannot be read or written.
    #[error("{path}: {reason}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A model result.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
