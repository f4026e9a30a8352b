use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SelectorError {
    #[error(transparent)]
    ConfigFile(#[from] rho_protocol::config_file::ConfigFileError),
    #[error("invalid config: field `{field}`: {reason}")]
    ConfigField { field: &'static str, reason: String },
    #[error("model {}", path.display())]
    Model {
        path: PathBuf,
        source: rho_model::ModelError,
    },
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("the reference model {model} has a vocabulary of {model_vocab}, too small for tokenizer {tokenizer} with {tokenizer_vocab} tokens")]
    VocabMismatch {
        model: PathBuf,
        model_vocab: usize,
        tokenizer: PathBuf,
        tokenizer_vocab: usize,
    },
    #[error("batch {seq} was tokenized with {got}, but this selector is configured with tokenizer {path} ({expected}); refusing to score it")]
    TokenizerMismatch {
        seq: u64,
        got: String,
        expected: String,
        path: PathBuf,
    },
    #[error("scoring batch {seq} failed")]
    Scoring {
        seq: u64,
        source: rho_model::ModelError,
    },
    #[error("a connection")]
    Client(#[from] rho_protocol::client::ClientError),
    #[error("the scored cache")]
    Cache(#[from] rho_protocol::cache::CacheError),
    #[error("a blocking task")]
    Task(#[from] tokio::task::JoinError),
}

pub type Result<T, E = SelectorError> = std::result::Result<T, E>;
