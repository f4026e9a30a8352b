//! What a run directory holds, read back: its summary, the trainer's report and metrics lines,
//! each selector's and the loader's metrics lines.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rho_loader::metrics::LoaderMetrics;
use rho_selector::SelectorMetrics;
use rho_trainer::StepMetrics;

use crate::supervise::Summary;

/// One run, as its directory holds it (a `rho run` directory, or any directory with a
/// trainer's `trainer.metrics.jsonl`).
pub struct RunData {
    /// The directory's name.
    pub name: String,
    /// The run directory.
    pub dir: PathBuf,
    /// `summary.json`, when the run ended under `rho run`.
    pub summary: Option<Summary>,
    /// The trainer's report (from the summary, or `trainer.report.json`).
    pub trainer: Option<rho_trainer::Report>,
    /// The trainer's metrics lines, one per step (earlier attempts' first).
    pub steps: Vec<StepMetrics>,
    /// Each selector's metrics lines, by process name.
    pub selectors: Vec<(String, Vec<SelectorMetrics>)>,
    /// The loader's metrics lines.
    pub loader: Vec<LoaderMetrics>,
}

/// The parseable lines of a JSON-lines file; none when it is missing.
fn lines<T: serde::de::DeserializeOwned>(path: &Path) -> Vec<T> {
    rho_common::jsonl::read_all(path).unwrap_or_default()
}

/// The trainer's metrics of every attempt, in order (`attempts/N/` first), without the steps a
/// later attempt trained again after resuming.
fn trainer_steps(dir: &Path) -> Vec<StepMetrics> {
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(dir.join("attempts"))
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut steps: Vec<StepMetrics> = Vec::new();
    let paths = files.into_iter().map(|(_, p)| p).chain([dir.to_path_buf()]);
    for path in paths {
        for m in lines::<StepMetrics>(&path.join("trainer.metrics.jsonl")) {
            // A resumed attempt starts after its checkpoint: what came after it is replaced.
            while steps.last().is_some_and(|s| s.step >= m.step) {
                steps.pop();
            }
            steps.push(m);
        }
    }
    steps
}

impl RunData {
    /// Reads a run directory; an error when it holds no trainer metrics and no report.
    pub fn read(dir: &Path) -> anyhow::Result<RunData> {
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dir.display().to_string());
        let summary: Option<Summary> = std::fs::read_to_string(dir.join("summary.json"))
            .ok()
            .map(|t| serde_json::from_str(&t))
            .transpose()
            .with_context(|| format!("{}: summary.json", dir.display()))?;
        let trainer = summary
            .as_ref()
            .and_then(|s| s.trainer.clone())
            .or_else(|| lines(&dir.join("trainer.report.json")).pop());
        let steps = trainer_steps(dir);
        anyhow::ensure!(
            !steps.is_empty() || trainer.is_some(),
            "{}: no trainer.metrics.jsonl and no trainer report: not a run directory",
            dir.display()
        );
        let mut selectors = Vec::new();
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .filter(|n| n.starts_with("selector-") && n.ends_with(".metrics.jsonl"))
            .collect();
        names.sort();
        for n in names {
            let process = n.trim_end_matches(".metrics.jsonl").to_string();
            selectors.push((process, lines(&dir.join(&n))));
        }
        Ok(RunData {
            name,
            dir: dir.to_path_buf(),
            summary,
            trainer,
            steps,
            selectors,
            loader: lines(&dir.join("loader.metrics.jsonl")),
        })
    }

    /// `(training tokens, held-out loss)` of each evaluation.
    pub fn eval_curve(&self) -> Vec<(f64, f64)> {
        match &self.trainer {
            Some(r) if !r.evals.is_empty() => r
                .evals
                .iter()
                .map(|e| (e.tokens as f64, f64::from(e.loss)))
                .collect(),
            _ => {
                let mut tokens = 0.0;
                let mut out = Vec::new();
                for s in &self.steps {
                    tokens += s.stats.tokens as f64;
                    if let Some(l) = s.eval_loss {
                        out.push((tokens, f64::from(l)));
                    }
                }
                out
            }
        }
    }

    /// `(step, value)` of a per-step metric.
    pub fn per_step(&self, value: impl Fn(&StepMetrics) -> f64) -> Vec<(f64, f64)> {
        self.steps
            .iter()
            .map(|s| (s.step as f64, value(s)))
            .collect()
    }

    /// Tokens trained on: the trainer's report, else the sum of the steps.
    pub fn tokens(&self) -> u64 {
        match &self.trainer {
            Some(r) => r.tokens,
            None => self.steps.iter().map(|s| s.stats.tokens).sum(),
        }
    }

    /// Steps taken.
    pub fn step_count(&self) -> u64 {
        match &self.trainer {
            Some(r) => r.steps,
            None => self.steps.last().map_or(0, |s| s.step),
        }
    }

    /// Trainer tokens/s over wall time in the steady state of the last attempt (its first fifth
    /// of steps left out).
    pub fn steady_tokens_per_s(&self) -> Option<f64> {
        // The last attempt: where the trainer's clock last started again.
        let start = (1..self.steps.len())
            .rev()
            .find(|&i| self.steps[i].elapsed_s < self.steps[i - 1].elapsed_s)
            .unwrap_or(0);
        let steps = &self.steps[start..];
        let n = steps.len();
        if n < 5 {
            return None;
        }
        let (a, b) = (&steps[n / 5], &steps[n - 1]);
        let tokens: u64 = steps[n / 5 + 1..].iter().map(|s| s.stats.tokens).sum();
        let secs = b.elapsed_s - a.elapsed_s;
        (secs > 0.0).then(|| tokens as f64 / secs)
    }
}
