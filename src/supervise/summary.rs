//! `summary.json`: how a supervised run ended, for people and for the commands that launch runs.

use std::path::PathBuf;

use rho_loader::metrics::LoaderMetrics;
use serde::{Deserialize, Serialize};

/// `summary.json` of a run directory, written when the run ends however it ends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub run_id: String,
    pub run_dir: PathBuf,
    pub wall_seconds: f64,
    pub selector_restarts: u64,
    pub interrupted: bool,
    /// The run's error, with its causes, when it failed.
    pub failed: Option<String>,
    pub steps: u64,
    /// The config file of every process.
    pub configs: Vec<PathBuf>,
    /// The trainer's report, when it wrote one.
    pub trainer: Option<rho_trainer::Report>,
    /// The loader's last metrics line.
    pub loader: Option<LoaderMetrics>,
    /// Under a trainer command, each rank's last progress line (`rho_stream`'s `metrics`), by
    /// rank; empty with the candle trainer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranks: Vec<Option<RankProgress>>,
}

/// One progress line of a rank of a trainer command (`RHO_METRICS`, written by
/// `rho_stream.RhoStream`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RankProgress {
    pub elapsed_s: f64,
    pub rank: u32,
    /// Batches the rank's training loop has taken (one per step in a data-parallel loop).
    pub batches: u64,
    /// The sequence number of the last one.
    pub seq: Option<u64>,
    /// Of its wall time, spent waiting for batches.
    pub data_wait_fraction: f64,
}
