use std::path::PathBuf;

use thiserror::Error;

/// Everything that stops a trainer. Each variant carries its cause as its `source`, so that
/// `{:#}` (or anyhow's report) prints the whole chain.
#[derive(Debug, Error)]
pub enum TrainerError {
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
    /// The model failed (loading, a forward or backward pass).
    #[error("model")]
    Model(#[from] rho_model::ModelError),
    /// A checkpoint that cannot be used as it is (not an IO failure).
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file cannot be read or written.
    #[error("file {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        #[source]
        /// The cause.
        source: std::io::Error,
    },
    /// A batch that cannot be trained on.
    #[error("batch {seq}: {reason}")]
    Batch {
        /// The batch's sequence number.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// The loader refused this trainer (a resume on another stream) and told it why.
    #[error("the loader refused this trainer: {reason}")]
    LoaderRefused {
        /// The loader's reason.
        reason: String,
    },
    /// The connection to the loader failed.
    #[error("the loader connection")]
    Client(#[from] rho_protocol::client::ClientError),
    /// The delivery endpoint failed.
    #[error("the delivery endpoint")]
    Producer(#[from] rho_protocol::producer::ProducerError),
    /// A blocking task panicked or was cancelled.
    #[error("a blocking task")]
    Task(#[from] tokio::task::JoinError),
}

impl TrainerError {
    /// A checkpoint at `path` that cannot be used, and why.
    pub fn checkpoint(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        TrainerError::Checkpoint {
            path: path.into(),
            reason: reason.to_string(),
        }
    }

    /// An IO failure on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainerError::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<candle_core::Error> for TrainerError {
    fn from(e: candle_core::Error) -> Self {
        TrainerError::Model(rho_model::ModelError::Candle(e))
    }
}

/// A trainer result.
pub type Result<T, E = TrainerError> = std::result::Result<T, E>;
