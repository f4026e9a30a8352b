//! `rho loader`, `rho selector`, `rho trainer`: one process of a pipeline, from its config.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::runtime::{print_report, set_threads, shutdown_signal, EXIT_STOPPED};

#[derive(Args)]
pub struct LoaderArgs {
    /// Loader config (JSON); see configs/loader.json.
    #[arg(long)]
    config: PathBuf,
    /// Start at this batch sequence number (overrides `start_batch`).
    #[arg(long)]
    start_batch: Option<u64>,
    /// Bind this endpoint (overrides `endpoint`).
    #[arg(long)]
    endpoint: Option<rho_protocol::Endpoint>,
    /// Serve the scored batches of this cache instead of tokenizing (overrides `scored`).
    #[arg(long)]
    scored: Option<PathBuf>,
}

#[derive(Args)]
pub struct SelectorArgs {
    /// Selector config (JSON); see configs/selector.json.
    #[arg(long)]
    config: PathBuf,
    /// Also write every scored batch to this cache directory (overrides `cache_out`).
    #[arg(long)]
    cache_out: Option<PathBuf>,
}

#[derive(Args)]
pub struct TrainerArgs {
    /// Trainer config (JSON); see configs/trainer.json.
    #[arg(long)]
    config: PathBuf,
}

/// `rho loader`: serves batches until the stream is exhausted and acknowledged.
pub async fn loader(args: LoaderArgs) -> anyhow::Result<()> {
    let mut config = rho_loader::LoaderConfig::load(&args.config)?;
    if let Some(n) = args.start_batch {
        config.start_batch = n;
    }
    if let Some(e) = args.endpoint {
        config.endpoint = e;
    }
    if let Some(dir) = args.scored {
        config.scored = Some(dir);
    }
    let report = rho_loader::run(config, shutdown_signal()).await?;
    print_report(&report)
}

/// `rho selector`: scores batches with the reference model.
pub async fn selector(args: SelectorArgs) -> anyhow::Result<()> {
    let mut config = rho_selector::SelectorConfig::load(&args.config)?;
    if let Some(dir) = args.cache_out {
        config.cache_out = Some(dir);
    }
    set_threads(config.threads)?;
    let report = rho_selector::run(config, shutdown_signal()).await?;
    print_report(&report)
}

/// `rho trainer`: trains; exits with [`EXIT_STOPPED`] when stopped before the stream ended.
pub async fn trainer(args: TrainerArgs) -> anyhow::Result<()> {
    let config = rho_trainer::TrainerConfig::load(&args.config)?;
    set_threads(config.threads)?;
    let eval = eval_batches(&config).context("reading the held-out batches")?;
    let report = rho_trainer::run(config, eval, shutdown_signal()).await?;
    print_report(&report)?;
    if report.interrupted {
        tracing::warn!(step = report.steps, "stopped before the stream ended");
        std::process::exit(EXIT_STOPPED);
    }
    Ok(())
}

/// Reads the held-out batches of a trainer's `eval.loader_config`, once.
fn eval_batches(
    config: &rho_trainer::TrainerConfig,
) -> anyhow::Result<Vec<rho_protocol::TokenBatch>> {
    let Some(eval) = &config.eval else {
        return Ok(Vec::new());
    };
    let loader = rho_loader::LoaderConfig::load(&eval.loader_config)?;
    let metrics = std::sync::Arc::new(rho_loader::metrics::Metrics::default());
    let mut stream = rho_loader::Stream::new(&loader, metrics)?;
    let mut out = Vec::new();
    stream.run(0, |b| {
        out.push(b);
        if out.len() >= eval.max_batches {
            rho_loader::Flow::Stop
        } else {
            rho_loader::Flow::Continue
        }
    })?;
    Ok(out)
}
