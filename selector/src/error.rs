use std::path::PathBuf;
use thiserror::Error;

/// Everything that stops a selector.
#[derive(Debug, Error)]
pub enum SelectorError {
    /// The config file cannot be read or parsed.
    #[error(transparent)]
    ConfigFile(#[from] rho_common::config_file::ConfigFileError),
    /// A config field is wrong.
    #[error("invalid config: field `{field}`: {reason}")]
    ConfigField {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The reference model cannot be loaded.
    #[error("model {}", path.display())]
    Model {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: rho_model::ModelError,
    },
    /// The tokenizer file cannot be loaded.
    #[error("tokenizer {path}: {reason}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The reference model cannot score every token of the tokenizer.
    #[error("the reference model {model} has a vocabulary of {model_vocab}, too small for tokenizer {tokenizer} with {tokenizer_vocab} tokens")]
    VocabMismatch {
        /// The model directory.
        model: PathBuf,
        /// Its vocabulary size.
        model_vocab: usize,
        /// The tokenizer file.
        tokenizer: PathBuf,
        /// Its vocabulary size.
        tokenizer_vocab: usize,
    },
    /// A batch made with another tokenizer.
    #[error("batch {seq} was tokenized with {got}, but this selector is configured with tokenizer {path} ({expected}); refusing to score it")]
    TokenizerMismatch {
        /// The batch's sequence number.
        seq: u64,
        /// What arrived.
        got: String,
        /// What was expected.
        expected: String,
        /// The file.
        path: PathBuf,
    },
    /// The model failed on a batch.
    #[error("scoring batch {seq} failed")]
    Scoring {
        /// The batch's sequence number.
        seq: u64,
        /// The cause.
        source: rho_model::ModelError,
    },
    /// The model gave a reference loss that is not a finite number; nothing was sent.
    #[error("batch {seq}: the reference model {reference} gave a reference loss of {value} at row {row}, position {position}, not a finite number; refusing to send it (a model in half precision can overflow: score in f32)")]
    NonFinite {
        /// The batch's sequence number.
        seq: u64,
        /// The reference model's fingerprint.
        reference: String,
        /// The row.
        row: usize,
        /// The target position in the row.
        position: usize,
        /// The value.
        value: f32,
    },
    /// A trainer refused this selector's batches and asked it to stop.
    #[error("the trainer asked this selector to stop ({trainer}): {reason}")]
    Stopped {
        /// The trainer's delivery endpoint.
        trainer: String,
        /// The trainer's reason.
        reason: String,
    },
    /// The loader refused what this selector asked of it (a credit for a rank it does not
    /// serve) and told it why.
    #[error("the loader refused this selector: {reason}")]
    LoaderRefused {
        /// The loader's reason.
        reason: String,
    },
    /// A connection failed.
    #[error("a connection")]
    Client(#[from] rho_protocol::client::ClientError),
    /// The scored cache cannot be written.
    #[error("the scored cache")]
    Cache(#[from] rho_common::cache::CacheError),
    /// A blocking task panicked or was cancelled.
    #[error("a blocking task")]
    Task(#[from] tokio::task::JoinError),
}

/// A selector result.
pub type Result<T, E = SelectorError> = std::result::Result<T, E>;
