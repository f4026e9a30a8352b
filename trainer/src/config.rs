//! The trainer's configuration.

use rho_protocol::Endpoint;
use serde::{Deserialize, Serialize};
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};

use crate::optim::OptimizerConfig;
use crate::selection::Selection;
use crate::{Result, TrainerError};

/// Which backend trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The `rho-model` decoder on candle.
    #[default]
    Candle,
    /// Consume and acknowledge only (pipeline measurements).
    Null,
}

/// Where a trainer's batches come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Selectors when the score rule needs reference losses, else the loader.
    #[default]
    Auto,
    /// Scored batches from selectors, on the delivery endpoint.
    Selectors,
    /// Batches straight from the loader (token batches, or a scored cache it serves).
    Loader,
}

/// Periodic checkpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Directory of `step-NNNNNNNN/` checkpoints and the `latest` pointer.
    pub dir: PathBuf,
    /// Every this many steps (and always at the end and on shutdown).
    #[serde(default)]
    pub every: Option<u64>,
    /// Without `resume`, remove the checkpoints an earlier run left in `dir` and start afresh.
    /// Default false: a run that does not resume refuses a directory holding checkpoints.
    #[serde(default)]
    pub overwrite: bool,
}

/// Held-out evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// A loader config over the held-out shards (same tokenizer); its batches are read once.
    pub loader_config: PathBuf,
    /// Evaluate every this many steps (and at the end).
    pub every: NonZeroU64,
    /// At most this many held-out batches. Default 8.
    #[serde(default = "d_eval_batches")]
    pub max_batches: usize,
}

fn d_eval_batches() -> usize {
    8
}

/// A trainer's config (`rho trainer --config FILE`, or the `trainer` section of a run);
/// docs/CONFIG.md describes every field.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerConfig {
    /// The run; messages of other runs are refused.
    #[serde(default = "d_run_id")]
    pub run_id: String,
    /// The loader's endpoint: acknowledgements go there, and token batches come from there when
    /// the score rule needs no reference. Required, except under `rho run`, which assigns it.
    #[serde(default)]
    pub loader: Endpoint,
    /// The endpoint this trainer binds for selectors to deliver scored batches.
    #[serde(default = "d_delivery")]
    pub delivery: Endpoint,
    /// Write the delivery endpoint selectors connect to here: the bound one, its host replaced
    /// by `advertise` (useful with port 0, and across hosts).
    #[serde(default)]
    pub delivery_file: Option<PathBuf>,
    /// The host (name or address) selectors on other hosts reach this trainer at, written in
    /// `delivery_file` in place of the bound host. Default: the bound host, or for a wildcard
    /// `0.0.0.0` the host's own name (`RHO_ADVERTISE`, Slurm's node name, the host name).
    #[serde(default)]
    pub advertise: Option<String>,
    /// `candle` (trains) or `null` (consumes only).
    #[serde(default)]
    pub backend: BackendChoice,
    /// The initial weights: a HuggingFace checkpoint directory (candle backend).
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// `cpu` (default), `cuda` or `cuda:N`.
    #[serde(default)]
    pub device: rho_model::DeviceSpec,
    /// Which tokens are trained on.
    #[serde(default)]
    pub selection: Selection,
    /// AdamW and its schedule.
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    /// Micro-batches per step (gradient accumulation); selection still spans the whole step.
    /// In one lane, each micro-batch's forward pass runs twice (once for the losses that
    /// selection needs, once under its backward pass) and only one micro-batch's activations
    /// are held at a time; in several `lanes`, the micro-batches run side by side and keep their
    /// activations from forward to backward (the memory of one whole batch). The gradients are
    /// the same bits in any number of lanes. Default: one per lane (2 on a CPU with at least 2
    /// threads, else 1); their count sets the last digits of a run's numbers, so set it where a
    /// run must repeat to the last digit on a machine with other threads or device.
    #[serde(default)]
    pub micro_batches: Option<NonZeroUsize>,
    /// Micro-batches run at once on the CPU, each on its own share of the threads (`threads /
    /// lanes`); only with `micro_batches` of 2 or more. A small model's products split poorly
    /// over many cores, and whole micro-batches side by side keep every core busy
    /// (docs/BENCHMARKS.md, "Lanes"). Default: 2 on the CPU with at least 2 threads, else 1; a
    /// GPU runs one at a time.
    #[serde(default)]
    pub lanes: Option<NonZeroUsize>,
    /// Stop once the run has taken this many steps in all (a global step: a run resumed at
    /// step 50 with `max_steps` 80 takes 30 more); default: when the stream ends.
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Where checkpoints go, and how often.
    #[serde(default)]
    pub checkpoint: Option<CheckpointConfig>,
    /// Continue from the newest complete checkpoint in `checkpoint.dir` when there is one.
    #[serde(default)]
    pub resume: bool,
    /// Stream items whose change from the checkpoint's stream a resume accepts, by their config
    /// names (`loader.data.paths` for the corpus, `loader.seed`, ...: see docs/CONFIG.md). A
    /// resume on a stream that differs in any other item is refused with the items named.
    #[serde(default)]
    pub accept_stream_changes: Vec<String>,
    /// Held-out evaluation.
    #[serde(default)]
    pub eval: Option<EvalConfig>,
    /// Scored batches each selector may have on its way to this trainer. Default 2.
    #[serde(default = "d_credits")]
    pub credits_per_selector: NonZeroU32,
    /// Scored batches held while waiting for an earlier one, at most. A selector gets its credit
    /// back as soon as its batch is buffered, while the buffer has room: a batch held up by a dead
    /// selector then cannot stall the others, and its redelivery can get through. Keep it at
    /// least the loader's `max_in_flight`. Default 64.
    #[serde(default = "d_reorder")]
    pub reorder_window: NonZeroUsize,
    /// Token batches asked of the loader ahead (without selectors). Default 2.
    #[serde(default = "d_credits")]
    pub prefetch: NonZeroU32,
    /// JSONL metrics, one line per step.
    #[serde(default)]
    pub metrics: Option<PathBuf>,
    /// Write TensorBoard event files of this process's scalars into this directory.
    #[serde(default)]
    pub tensorboard: Option<PathBuf>,
    /// The run's shared secret (a file); every message is then signed and checked. Without it,
    /// the `RHO_SECRET` environment variable, else no authentication.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// CPU threads for model math; default: every core (or `RAYON_NUM_THREADS`).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Heartbeats to the producers and reconnection when one falls silent.
    #[serde(default)]
    pub liveness: rho_protocol::Liveness,
    /// Where batches come from: `selectors` (scored, on the delivery endpoint; the default when
    /// the score rule needs reference losses) or `loader` (straight from the loader: token
    /// batches, or scored batches of a cache served with `rho loader --scored`).
    #[serde(default)]
    pub source: Source,
    /// Largest message accepted.
    #[serde(default = "d_max_message")]
    pub max_message_bytes: u64,
}

fn d_run_id() -> String {
    "rho".into()
}
fn d_delivery() -> Endpoint {
    Endpoint::new("tcp://127.0.0.1:5556").unwrap_or_default()
}
fn d_credits() -> NonZeroU32 {
    NonZeroU32::MIN.saturating_add(1)
}
fn d_reorder() -> NonZeroUsize {
    NonZeroUsize::MIN.saturating_add(63)
}
fn d_max_message() -> u64 {
    256 << 20
}

impl TrainerConfig {
    /// Reads and validates a config file; relative paths are relative to its directory.
    pub fn load(path: &Path) -> Result<Self> {
        let mut config: TrainerConfig = rho_common::config_file::read_json(path)?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        config.validate()?;
        Ok(config)
    }

    /// Makes relative paths relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| rho_common::config_file::resolve(base, p);
        for p in [
            &mut self.model,
            &mut self.metrics,
            &mut self.tensorboard,
            &mut self.delivery_file,
            &mut self.secret_file,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        if let Some(c) = &mut self.checkpoint {
            fix(&mut c.dir);
        }
        if let Some(e) = &mut self.eval {
            fix(&mut e.loader_config);
        }
    }

    /// Checks what serde cannot; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: String| Err(TrainerError::ConfigField { field, reason });
        for (name, e) in [("loader", &self.loader), ("delivery", &self.delivery)] {
            e.check().map_err(|reason| TrainerError::ConfigField {
                field: name,
                reason,
            })?;
        }
        if self.backend == BackendChoice::Candle && self.model.is_none() {
            return bad(
                "model",
                "the candle backend needs initial weights (a checkpoint directory)".into(),
            );
        }
        if let Err(e) = self.selection.schedule.validate() {
            return bad("selection.schedule", e);
        }
        if let Err((field, reason)) = self.liveness.validate() {
            return bad(field, reason);
        }
        if self.optimizer.lr <= 0.0 {
            return bad("optimizer.lr", "must be positive".into());
        }
        if self.resume && self.checkpoint.is_none() {
            return bad("resume", "needs `checkpoint.dir` to resume from".into());
        }
        if let Err(reason) = rho_model::lanes::check(self.lanes, self.device, self.threads) {
            return bad("lanes", reason);
        }
        if let Some(item) = self
            .accept_stream_changes
            .iter()
            .find(|i| !rho_protocol::STREAM_ITEMS.contains(&i.as_str()))
        {
            return bad(
                "accept_stream_changes",
                format!(
                    "`{item}` is not an item of a stream; the items are {}",
                    rho_protocol::STREAM_ITEMS.join(", ")
                ),
            );
        }
        Ok(())
    }

    /// Whether batches come through selectors (the score rule needs reference losses).
    pub fn uses_selectors(&self) -> bool {
        self.selection.score.needs_reference() && self.source != Source::Loader
    }
}
