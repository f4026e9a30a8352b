use std::path::PathBuf;

use thiserror::Error;

/// Everything that stops a trainer. Each variant carries its cause as its `source`, so that
/// `{:#}` (or anyhow's report) prints the whole chain.
#[derive(Debug, Error)]
pub enum TrainerError {
    #[error(transparent)]
    ConfigFile(#[from] rho_protocol::config_file::ConfigFileError),
    #[error("invalid config: field `{field}`: {reason}")]
    ConfigField { field: &'static str, reason: String },
    #[error("model")]
    Model(#[from] rho_model::ModelError),
    /// A checkpoint that cannot be used as it is (not an IO failure).
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },
    #[error("file {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("batch {seq}: {reason}")]
    Batch { seq: u64, reason: String },
    #[error("the loader connection")]
    Client(#[from] rho_protocol::client::ClientError),
    #[error("the delivery endpoint")]
    Producer(#[from] rho_protocol::producer::ProducerError),
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

pub type Result<T, E = TrainerError> = std::result::Result<T, E>;
