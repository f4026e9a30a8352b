use std::path::PathBuf;
use thiserror::Error;

/// Everything that stops a loader. Bad *data* never does: it is skipped, counted and logged.
#[derive(Debug, Error)]
pub enum LoaderError {
    #[error(transparent)]
    ConfigFile(#[from] rho_protocol::config_file::ConfigFileError),
    #[error("invalid config: field `{field}`: {reason}")]
    ConfigField { field: &'static str, reason: String },
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("no shard found for `data.paths` {patterns:?}")]
    NoShards { patterns: Vec<String> },
    #[error("the corpus yields no tokens (all {shards} shards empty or unreadable)")]
    EmptyCorpus { shards: usize },
    #[error("cannot start at batch {seq}: the stream holds {total} batches")]
    SeekPastEnd { seq: u64, total: u64 },
    #[error("file {}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the endpoint")]
    Producer(#[from] rho_protocol::producer::ProducerError),
    #[error("a blocking task")]
    Task(#[from] tokio::task::JoinError),
    #[error("the stream failed")]
    Stream(#[source] Box<LoaderError>),
    #[error(transparent)]
    Cache(#[from] rho_protocol::cache::CacheError),
    #[error("tokenizer training failed: {0}")]
    Training(String),
}

pub type Result<T, E = LoaderError> = std::result::Result<T, E>;
