//! `rho bench ...`: benchmarks whose numbers are recorded in docs/BENCHMARKS.md.

use std::path::PathBuf;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Pipelined SLM against sequential SLM and plain causal LM with one core per process,
    /// selector scaling with a large reference, and memory over a long run.
    Pipeline(pipeline::PipelineArgs),
    /// Training step time of selective LM (k = 0.6, excess loss) against plain causal LM on the
    /// same model and batches, alternating so that drift hits both alike.
    Trainer {
        /// Working directory (model).
        #[arg(long, default_value = "runs/bench-trainer")]
        out: PathBuf,
        /// Model size: tiny, small, 20m or 60m.
        #[arg(long, default_value = "20m")]
        preset: String,
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        /// Steps per measurement round (4 rounds of each mode).
        #[arg(long, default_value_t = 3)]
        steps: u64,
        /// Vocabulary of the model (its directory is `model-<preset>`, or
        /// `model-<preset>-v<size>` for another size than the default).
        #[arg(long, default_value_t = trainer::DEFAULT_VOCAB)]
        vocab_size: usize,
        /// Micro-batches per step (the trainer's `micro_batches`); default: the trainer's default.
        #[arg(long)]
        micro_batches: Option<std::num::NonZeroUsize>,
        /// Micro-batches run at once (the trainer's `lanes`); default: the trainer's default.
        #[arg(long)]
        lanes: Option<std::num::NonZeroUsize>,
    },
    /// Selector throughput (a real `rho loader` and `rho selector`, this process as the trainer)
    /// against the bare in-process forward of the same model on batches of the same shape.
    Selector {
        /// Working directory (corpus, tokenizer, model).
        #[arg(long, default_value = "runs/bench-selector")]
        out: PathBuf,
        /// Reference model size: tiny, small, 20m or 60m.
        #[arg(long, default_value = "20m")]
        preset: String,
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        /// Batches to score in each measurement.
        #[arg(long, default_value_t = 12)]
        batches: usize,
        /// The selector process's `lanes` (batches scored at once); default: its own default.
        #[arg(long)]
        lanes: Option<std::num::NonZeroUsize>,
    },
    /// What a device does with rho's models, as one JSON (`bench/gpu/check.sh` runs it on a
    /// GPU): fixture losses against the CPU in f32 and half precision, reference throughput and
    /// memory, training steps, a short `rho run` on the device.
    Device(device::DeviceArgs),
    /// End-to-end loader throughput (read + tokenize + pack + encode + send, consumed over
    /// loopback) against raw `tokenizers` encoding of the same text.
    Loader(loader::LoaderArgs),
    /// One loader of every rank and selectors with a null model routing to W null ranks:
    /// batches/s delivered, against the need of a number of trainer GPUs.
    Fanout(fanout::FanoutArgs),
}

mod corpus;
mod device;
mod fanout;
mod loader;
mod pipeline;
mod selector;
mod trainer;

/// Runs a benchmark.
pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Pipeline(args) => pipeline::run(args).await,
        BenchCommand::Fanout(args) => fanout::run(args).await,
        BenchCommand::Trainer {
            out,
            preset,
            seq_len,
            batch_size,
            steps,
            vocab_size,
            micro_batches,
            lanes,
        } => trainer::run(
            out,
            preset,
            (seq_len, batch_size),
            steps,
            vocab_size,
            (micro_batches, lanes),
        ),
        BenchCommand::Selector {
            out,
            preset,
            seq_len,
            batch_size,
            batches,
            lanes,
        } => selector::run(out, preset, seq_len, batch_size, batches, lanes).await,
        BenchCommand::Loader(args) => loader::run(args).await,
        BenchCommand::Device(args) => device::run(args).await,
    }
}
