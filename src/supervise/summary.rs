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
}
