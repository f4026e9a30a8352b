use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrainerError {
    #[error(transparent)]
    ConfigFile(#[from] rho_protocol::config_file::ConfigFileError),
    #[error("invalid config: field `{field}`: {reason}")]
    ConfigField { field: &'static str, reason: String },
    #[error("model: {0}")]
    Model(#[from] rho_model::ModelError),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("batch {seq}: {reason}")]
    Batch { seq: u64, reason: String },
    #[error("transport: {0}")]
    Transport(String),
}

impl From<candle_core::Error> for TrainerError {
    fn from(e: candle_core::Error) -> Self {
        TrainerError::Model(rho_model::ModelError::Candle(e))
    }
}

impl From<rho_protocol::client::ClientError> for TrainerError {
    fn from(e: rho_protocol::client::ClientError) -> Self {
        TrainerError::Transport(e.to_string())
    }
}

pub type Result<T, E = TrainerError> = std::result::Result<T, E>;
