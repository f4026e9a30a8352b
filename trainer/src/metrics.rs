//! The trainer's per-step metrics: one [`StepMetrics`] per optimizer step, written as a JSON
//! line to `metrics` and read back by the progress line, the supervisor and the demo report.

use serde::{Deserialize, Serialize};

use crate::backend::StepStats;

/// What one optimizer step measured, as written to the metrics file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    /// Steps taken, this one included.
    pub step: u64,
    /// The sequence number of the batch trained on.
    pub seq: u64,
    /// Seconds since the trainer started.
    pub elapsed_s: f64,
    /// What the step measured (its fields are written inline).
    #[serde(flatten)]
    pub stats: StepStats,
    /// `tokens` over the step's compute time.
    pub tokens_per_s: f64,
    /// Fraction of the wall time so far spent waiting for batches.
    pub data_wait_fraction: f64,
    /// Held-out loss, on steps that evaluated.
    pub eval_loss: Option<f32>,
    /// Batches received again so far (dropped).
    pub duplicates: u64,
    /// Scored batches refused so far (another reference model, or reference losses that are
    /// not finite); each one is scored again by another selector.
    #[serde(default)]
    pub reference_refused: u64,
}

impl StepMetrics {
    /// The trainer's progress line for this step.
    pub fn progress_line(&self) -> String {
        format!(
            "trainer: step {} | loss sel {:.3} all {:.3} | selected {:.0}% | lr {:.2e} | {:.0} tok/s | waiting {:.0}%",
            self.step,
            self.stats.loss_selected,
            self.stats.loss_all,
            self.stats.selected_fraction * 100.0,
            self.stats.lr,
            self.tokens_per_s,
            self.data_wait_fraction * 100.0
        )
    }

    /// The step's scalars as TensorBoard shows them (`trainer/...`, `eval/loss` when evaluated).
    pub fn scalars(&self) -> Vec<(&'static str, f64)> {
        let s = &self.stats;
        let mut v = vec![
            ("trainer/loss_all", f64::from(s.loss_all)),
            ("trainer/loss_selected", f64::from(s.loss_selected)),
            ("trainer/selected_fraction", f64::from(s.selected_fraction)),
            ("trainer/mean_excess", f64::from(s.mean_excess)),
            ("trainer/lr", s.lr),
            ("trainer/grad_norm", f64::from(s.grad_norm)),
            ("trainer/tokens_per_s", self.tokens_per_s),
            ("trainer/data_wait_fraction", self.data_wait_fraction),
        ];
        if let Some(loss) = self.eval_loss {
            v.push(("eval/loss", f64::from(loss)));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_reads_back_as_written_and_torn_lines_are_skipped() {
        let m = StepMetrics {
            step: 3,
            seq: 2,
            eval_loss: Some(1.5),
            stats: StepStats {
                lr: 1e-3,
                tokens: 4,
                ..Default::default()
            },
            ..Default::default()
        };
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("m.jsonl");
        let line = serde_json::to_string(&m).unwrap();
        std::fs::write(&path, format!("{line}\n{}", &line[..line.len() / 2])).unwrap();
        assert_eq!(
            rho_common::jsonl::read_all::<StepMetrics>(&path).unwrap(),
            vec![m]
        );
    }
}
