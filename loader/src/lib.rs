//! The rho loader: streams OpenWebMath-style shards (parquet, jsonl, jsonl.gz, jsonl.zst),
//! tokenizes them with a HuggingFace `tokenizer.json` in parallel, packs documents into windows
//! of `seq_len + 1` tokens, orders them deterministically, and serves batches over ZeroMQ to
//! consumers that ask for them, keeping every batch until it is acknowledged.
//!
//! `run(config, shutdown)` is the whole process; `Stream` is the deterministic batch sequence
//! alone (what tests and benchmarks drive directly).

#![warn(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod config;
mod error;
mod index;
pub mod metrics;
pub mod order;
mod pack;
mod serve;
pub mod sources;
mod stream;
mod tokenize;
pub mod train;

pub use config::{DataConfig, FormatChoice, LoaderConfig, RankStride};
pub use error::{LoaderError, Result};
pub use serve::{serve, Loader, Report, Source};
pub use stream::{Flow, Stream};
pub use tokenize::TextTokenizer;

use std::future::Future;
use std::sync::Arc;

/// Runs a loader until its stream is served and acknowledged, or `shutdown` resolves.
pub async fn run(config: LoaderConfig, shutdown: impl Future<Output = ()>) -> Result<Report> {
    config.validate()?;
    let metrics = Arc::new(metrics::Metrics::default());
    if let Some(dir) = &config.scored {
        let cache = open_cache(&config, dir)?;
        tracing::info!(cache = %dir.display(), batches = cache.contiguous(), ref_model = %cache.header().ref_model, "serving a scored cache");
        return serve::serve(&config, Source::Cache(cache), metrics, shutdown).await;
    }
    let cfg = config.clone();
    let m = metrics.clone();
    let stream = tokio::task::spawn_blocking(move || Stream::new(&cfg, m)).await??;
    tracing::info!(
        shards = stream.shards().len(),
        tokenizer = %stream.tokenizer().fingerprint(),
        vocab = stream.tokenizer().vocab_size(),
        "loader ready"
    );
    let stream = Source::Tokens(Box::new(stream));
    serve::serve(&config, stream, metrics, shutdown).await
}

/// Opens a scored cache and checks that it belongs to this loader's run, tokenizer and (when
/// configured) reference model.
fn open_cache(
    config: &LoaderConfig,
    dir: &std::path::Path,
) -> Result<rho_common::cache::CacheReader> {
    let cache = rho_common::cache::CacheReader::open(dir)?;
    let h = cache.header();
    let refuse = |field: &'static str, reason: String| LoaderError::ConfigField { field, reason };
    let tokenizer = rho_protocol::Fingerprint::of_file(&config.tokenizer).map_err(|source| {
        LoaderError::Io {
            path: config.tokenizer.clone(),
            source,
        }
    })?;
    if h.tokenizer != tokenizer {
        return Err(refuse(
            "scored",
            format!(
                "the cache {} was made with tokenizer {}, but `tokenizer` ({}) is {tokenizer}",
                dir.display(),
                h.tokenizer,
                config.tokenizer.display()
            ),
        ));
    }
    if let Some(expected) = &config.scored_ref_model {
        if h.ref_model.0 != *expected {
            return Err(refuse(
                "scored_ref_model",
                format!(
                    "the cache {} was scored by reference {}, not {expected}",
                    dir.display(),
                    h.ref_model
                ),
            ));
        }
    }
    if h.run_id != config.run_id {
        return Err(refuse(
            "run_id",
            format!(
                "the cache {} belongs to run `{}`, this loader to `{}`",
                dir.display(),
                h.run_id,
                config.run_id
            ),
        ));
    }
    if cache.contiguous() == 0 {
        return Err(refuse(
            "scored",
            format!("the cache {} holds no batch 0", dir.display()),
        ));
    }
    Ok(cache)
}
