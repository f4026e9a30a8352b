//! The rho loader: streams OpenWebMath-style shards (parquet, jsonl, jsonl.gz, jsonl.zst),
//! tokenizes them with a HuggingFace `tokenizer.json` in parallel, packs documents into windows
//! of `seq_len + 1` tokens, orders them deterministically, and serves batches over ZeroMQ to
//! consumers that ask for them, keeping every batch until it is acknowledged.
//!
//! `run(config, shutdown)` is the whole process; `Stream` is the deterministic batch sequence
//! alone (what tests and benchmarks drive directly).

pub mod config;
mod error;
pub mod index;
pub mod metrics;
pub mod order;
pub mod pack;
pub mod serve;
pub mod sources;
pub mod stream;
pub mod tokenize;
pub mod train;

pub use config::{DataConfig, FormatChoice, LoaderConfig};
pub use error::{LoaderError, Result};
pub use serve::Report;
pub use stream::{Flow, Stream};

use std::future::Future;
use std::sync::Arc;

/// Runs a loader until its stream is served and acknowledged, or `shutdown` resolves.
pub async fn run(config: LoaderConfig, shutdown: impl Future<Output = ()>) -> Result<Report> {
    config.validate()?;
    let metrics = Arc::new(metrics::Metrics::default());
    let cfg = config.clone();
    let m = metrics.clone();
    let stream = tokio::task::spawn_blocking(move || Stream::new(&cfg, m))
        .await
        .map_err(|e| LoaderError::Transport(format!("start-up task failed: {e}")))??;
    tracing::info!(
        shards = stream.shards().len(),
        tokenizer = %stream.tokenizer().fingerprint(),
        vocab = stream.tokenizer().vocab_size(),
        "loader ready"
    );
    serve::serve(&config, stream, metrics, shutdown).await
}
