//! `rho`: one executable for every process of a Selective Language Modeling run.
//!
//! This file parses arguments, sets up logging and hands over: to the process libraries
//! ([`commands::process`]), the supervisor ([`supervise`]), the demo ([`demo`]), the benchmarks
//! ([`mod@bench`]), the synthetic corpus ([`synth`]) and the tools ([`commands`]).

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod bench;
mod commands;
mod demo;
mod report;
mod runtime;
mod supervise;
mod synth;

use std::path::PathBuf;

/// Model math allocates and frees large buffers at every step; mimalloc keeps them instead of
/// returning them to the system each time (a third of a forward's time with the system allocator).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};

use commands::{concentrate, model as model_cmd, process, tokenizer};
use runtime::{keep_freed_memory, shutdown_signal, LogWriter, EXIT_STOPPED};

#[derive(Parser)]
#[command(
    name = "rho",
    version,
    about = "Selective Language Modeling (Rho-1) as a streaming system"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The paper's effect end to end: reference, causal-LM and SLM pipelines on a synthetic corpus, and a report.
    Demo(demo::DemoArgs),
    /// Start and supervise a whole pipeline (loader, selectors, trainer) from one config.
    Run {
        /// Run config (JSON); see configs/run.json.
        config: PathBuf,
    },
    /// Stream, tokenize, pack and serve batches.
    Loader(process::LoaderArgs),
    /// Score token batches with a reference model (the selector process).
    Selector(process::SelectorArgs),
    /// Train on scored (or plain) batches: selective language modeling.
    Trainer(process::TrainerArgs),
    /// Print per-token losses of a model on text, a shard or token ids.
    Score(model_cmd::ScoreArgs),
    /// Model tools.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(tokenizer::TokenizerCommand),
    /// Benchmarks whose numbers go to docs/BENCHMARKS.md.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Write a synthetic OpenWebMath-style corpus as parquet shards.
    Synth(synth::SynthArgs),
    /// One page comparing runs: held-out loss, training loss, throughput, selection.
    Report(report::ReportArgs),
    /// Keep the tokens a scoring rule selects as a smaller dataset (parquet with a token mask).
    Concentrate(concentrate::ConcentrateArgs),
}

fn main() -> anyhow::Result<()> {
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(|| LogWriter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Run { config } => match supervise::run(&config, shutdown_signal()).await? {
                supervise::RunEnd::Finished => Ok(()),
                supervise::RunEnd::Stopped => std::process::exit(EXIT_STOPPED),
            },
            Command::Loader(args) => process::loader(args).await,
            Command::Selector(args) => process::selector(args).await,
            Command::Trainer(args) => process::trainer(args).await,
            Command::Score(args) => model_cmd::score(args),
            Command::Model(cmd) => model_cmd::run(cmd),
            Command::Tokenizer(cmd) => tokenizer::run(cmd),
            Command::Bench(cmd) => bench::run(cmd).await,
            Command::Synth(args) => synth::run(args),
            Command::Concentrate(args) => concentrate::run(args),
            Command::Report(args) => report::run(args),
        }
    })
}
