use std::path::PathBuf;
use thiserror::Error;

/// Everything that stops a loader. Bad *data* never does: it is skipped, counted and logged.
#[derive(Debug, Error)]
pub enum LoaderError {
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
    /// The tokenizer file cannot be loaded.
    #[error("tokenizer {path}: {reason}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `data.paths` matches no file.
    #[error("no shard found for `data.paths` {patterns:?}")]
    NoShards {
        /// The patterns given.
        patterns: Vec<String>,
    },
    /// Every shard is empty or unreadable.
    #[error("the corpus yields no tokens (all {shards} shards empty or unreadable): {listed}")]
    EmptyCorpus {
        /// Shards found.
        shards: usize,
        /// The first shards, each with what is wrong with it where the file system says
        /// (`held.jsonl (does not exist)`).
        listed: String,
    },
    /// A start (or resume) past the end of the stream.
    #[error("cannot start at batch {seq}: the stream holds {total} batches")]
    SeekPastEnd {
        /// The batch's sequence number.
        seq: u64,
        /// Batches in the stream.
        total: u64,
    },
    /// A file cannot be read or written.
    #[error("file {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The endpoint failed.
    #[error("the endpoint")]
    Producer(#[from] rho_protocol::producer::ProducerError),
    /// A blocking task panicked or was cancelled.
    #[error("a blocking task")]
    Task(#[from] tokio::task::JoinError),
    /// The producer thread's stream failed.
    #[error("the stream failed")]
    Stream(#[source] Box<LoaderError>),
    /// The scored cache cannot be read.
    #[error(transparent)]
    Cache(#[from] rho_common::cache::CacheError),
    /// Training a tokenizer failed.
    #[error("tokenizer training failed: {0}")]
    Training(String),
}

/// A loader result.
pub type Result<T, E = LoaderError> = std::result::Result<T, E>;

impl LoaderError {
    /// [`LoaderError::EmptyCorpus`] of `shards`, the first of them named.
    pub fn empty_corpus(shards: &[crate::sources::Shard]) -> Self {
        const NAMED: usize = 8;
        let mut listed: Vec<String> = shards
            .iter()
            .take(NAMED)
            .map(|s| match std::fs::metadata(&s.path) {
                Ok(m) if m.len() == 0 => format!("{} (empty)", s.path.display()),
                Ok(_) => s.path.display().to_string(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    format!("{} (does not exist)", s.path.display())
                }
                Err(e) => format!("{} ({e})", s.path.display()),
            })
            .collect();
        if shards.len() > NAMED {
            listed.push(format!("and {} more", shards.len() - NAMED));
        }
        LoaderError::EmptyCorpus {
            shards: shards.len(),
            listed: listed.join(", "),
        }
    }
}
