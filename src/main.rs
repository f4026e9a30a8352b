//! `rho`: one executable for every process of a Selective Language Modeling run.
//!
//! This file parses arguments, sets up logging and hands over to the libraries.

mod bench;
mod bench_pipeline;
mod bench_selector;
mod bench_trainer;
mod concentrate;
mod corpus;
mod demo;
mod demo_report;
mod model_cmd;
mod supervise;

use std::path::PathBuf;

/// Model math allocates and frees large buffers at every step; mimalloc keeps them instead of
/// returning them to the system each time (a third of a forward's time with the system allocator).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

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
    Loader(LoaderArgs),
    /// Score token batches with a reference model (the selector process).
    Selector(SelectorArgs),
    /// Train on scored (or plain) batches: selective language modeling.
    Trainer(TrainerArgs),
    /// Print per-token losses of a model on text, a shard or token ids.
    Score(model_cmd::ScoreArgs),
    /// Model tools.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Benchmarks whose numbers go to docs/BENCHMARKS.md.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Write a synthetic OpenWebMath-style corpus as parquet shards.
    Synth(corpus::SynthArgs),
    /// Keep the tokens a scoring rule selects as a smaller dataset (parquet with a token mask).
    Concentrate(concentrate::ConcentrateArgs),
}

#[derive(Args)]
struct LoaderArgs {
    /// Loader config (JSON); see configs/loader.json.
    #[arg(long)]
    config: PathBuf,
    /// Start at this batch sequence number (overrides `start_batch`).
    #[arg(long)]
    start_batch: Option<u64>,
    /// Bind this endpoint (overrides `endpoint`).
    #[arg(long)]
    endpoint: Option<String>,
    /// Serve the scored batches of this cache instead of tokenizing (overrides `scored`).
    #[arg(long)]
    scored: Option<PathBuf>,
}

#[derive(Args)]
struct SelectorArgs {
    /// Selector config (JSON); see configs/selector.json.
    #[arg(long)]
    config: PathBuf,
    /// Also write every scored batch to this cache directory (overrides `cache_out`).
    #[arg(long)]
    cache_out: Option<PathBuf>,
}

#[derive(Args)]
struct TrainerArgs {
    /// Trainer config (JSON); see configs/trainer.json.
    #[arg(long)]
    config: PathBuf,
}

/// Loads a `tokenizer.json` as every rho process does: its own padding and truncation off.
pub(crate) fn load_tokenizer(path: &std::path::Path) -> anyhow::Result<tokenizers::Tokenizer> {
    rho_protocol::tokenizer::load(path)
        .map(|t| t.tokenizer)
        .map_err(|e| anyhow::anyhow!("tokenizer {}: {e}", path.display()))
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

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer on shards.
    Train {
        /// Shard files, directories or globs.
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<String>,
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        /// Column or key holding the text.
        #[arg(long, default_value = "text")]
        text_field: String,
        /// Train on at most this many documents.
        #[arg(long)]
        max_docs: Option<u64>,
        #[arg(long)]
        out: PathBuf,
    },
}

/// Resolves on Ctrl-C, SIGTERM or SIGHUP (a closed terminal), or when the supervisor that
/// started this process is gone.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let unix = async {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(mut term), Ok(mut hup)) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = hup.recv() => {},
                }
            }
            _ => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let unix = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = unix => {},
        _ = supervisor_gone() => {},
    }
}

/// A process started by `rho run` dies with it: `rho run` puts its pid in `RHO_SUPERVISOR_PID`,
/// and this resolves as soon as this process's parent is no longer that pid (the supervisor was
/// killed, even by SIGKILL, and this process was handed to another parent). Pending otherwise.
async fn supervisor_gone() {
    #[cfg(unix)]
    if let Some(pid) = std::env::var(supervise::SUPERVISOR_PID_VAR)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
    {
        loop {
            if std::os::unix::process::parent_id() != pid {
                tracing::warn!(supervisor = pid, "the supervisor is gone: stopping");
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    std::future::pending::<()>().await
}

/// Prints a process's report on stdout; a stdout that cannot be written (a full disk under
/// `rho run`) is logged, not a panic.
fn print_report(report: &impl serde::Serialize) -> anyhow::Result<()> {
    use std::io::Write;
    let line = serde_json::to_string(report)?;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|_| out.flush()) {
        tracing::warn!("cannot write the report to stdout: {e}");
    }
    Ok(())
}

/// The exit status of a process stopped by a signal before its work was done (128 + SIGINT),
/// so that scripts can tell it from a finished one.
pub(crate) const EXIT_STOPPED: i32 = 130;

/// mimalloc's `mi_option_purge_delay` (mimalloc.h, v2).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory instead of returning it to the system: a training step frees and
/// reallocates the same large buffers, and the kernel zeroing fresh pages for them took a fifth
/// of the step's time. A `MIMALLOC_PURGE_DELAY` set in the environment wins.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        #[allow(unsafe_code)]
        // SAFETY: setting a mimalloc option is a plain store into its option table, valid at any time.
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1)
        };
    }
}

/// Limits model math to `threads` CPU threads: candle's matrix products read
/// `RAYON_NUM_THREADS` and its element-wise kernels run on rayon's global pool.
fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    let Some(mut n) = threads else { return Ok(()) };
    if n == 0 {
        anyhow::bail!("`threads` must be at least 1");
    }
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    if n > cores {
        tracing::warn!(
            threads = n,
            cores,
            "`threads` is more than this machine's cores: using {cores}"
        );
        n = cores;
    }
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .context("setting up the thread pool")
}

/// stderr for the logs, where a failed write is dropped: a log that cannot be written (a full
/// disk, a supervisor gone with the other end of the pipe) never stops a process that can still
/// work. (The stock writer reports the failure with `eprintln!`, which panics.)
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
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
            Command::Loader(args) => {
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
            Command::Selector(args) => {
                let mut config = rho_selector::SelectorConfig::load(&args.config)?;
                if let Some(dir) = args.cache_out {
                    config.cache_out = Some(dir);
                }
                set_threads(config.threads)?;
                let report = rho_selector::run(config, shutdown_signal()).await?;
                print_report(&report)
            }
            Command::Trainer(args) => {
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
            Command::Score(args) => model_cmd::score(args),
            Command::Model(cmd) => model_cmd::run(cmd),
            Command::Tokenizer(TokenizerCommand::Train {
                input,
                vocab_size,
                text_field,
                max_docs,
                out,
            }) => {
                let data = rho_loader::DataConfig {
                    paths: input,
                    text_field,
                    format: rho_loader::FormatChoice::Auto,
                };
                let report = rho_loader::train::train_bpe(&data, vocab_size, max_docs, &out)
                    .with_context(|| format!("training a tokenizer into {}", out.display()))?;
                eprintln!(
                    "trained a byte-level BPE of {} tokens on {} documents: {}",
                    report.vocab_size,
                    report.documents,
                    out.display()
                );
                Ok(())
            }
            Command::Bench(cmd) => bench::run(cmd).await,
            Command::Synth(args) => corpus::run(args),
            Command::Concentrate(args) => concentrate::run(args),
        }
    })
}
