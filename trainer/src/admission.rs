//! What a batch must be before the trainer takes it into its stream.
//!
//! Rules, checked on every batch as it arrives (before it is buffered):
//! - **one reference per run**: the run's reference model is `selection.reference_fingerprint`
//!   when the config names one, else the checkpoint's on resume, else the first scored batch's;
//!   a scored batch of another reference is refused;
//! - **finite reference losses**: a NaN or an infinity at a valid position is refused;
//! - **the checkpoint's stream**: a resumed run's batches have the tokenizer and `seq_len` its
//!   checkpoint was trained on; a difference stops the run with the item named.
//!
//! A refused batch is not trained on and not acknowledged: its lease hands it out again, to a
//! selector that scores it with the run's reference.

use std::path::PathBuf;

use rho_protocol::{Fingerprint, ScoredBatch, TokenBatch};

use crate::checkpoint::StreamSeen;
use crate::{Result, TrainerError};

/// The checks of the module documentation, and what they have fixed so far.
#[derive(Debug, Clone, Default)]
pub struct Admission {
    /// What the stream is: fixed by the config, the checkpoint, or the first batch.
    seen: StreamSeen,
    /// Whether `seen` came from a checkpoint (then a difference is the stream's, not a batch's).
    resumed_from: Option<PathBuf>,
    /// The checkpoint's reference, when this run deliberately changes it (logged once the new
    /// one is known).
    changed_from: Option<Fingerprint>,
}

impl Admission {
    /// The checks of a run whose config names `reference` (or not), resumed from `saved` (the
    /// checkpoint at `dir` and what it saw of its stream) or fresh. `change_reference` lets the
    /// config's reference, or the first scored batch's, replace the checkpoint's.
    pub fn new(
        reference: Option<Fingerprint>,
        change_reference: bool,
        saved: Option<(PathBuf, StreamSeen)>,
    ) -> Result<Self> {
        let Some((dir, saved)) = saved else {
            return Ok(Admission {
                seen: StreamSeen {
                    reference,
                    ..StreamSeen::default()
                },
                ..Admission::default()
            });
        };
        let mut seen = saved.clone();
        let mut changed_from = None;
        match (&reference, &saved.reference) {
            (Some(now), Some(then)) if now != then && !change_reference => {
                return Err(TrainerError::checkpoint(
                    dir,
                    format!("was trained against the reference model {then}, but `selection.reference_fingerprint` is {now}: set `selection.change_reference` to change the reference deliberately"),
                ));
            }
            (Some(now), Some(then)) if now != then => {
                tracing::warn!(checkpoint = %then, config = %now, "the reference model changes on this resume (`selection.change_reference`)");
                seen.reference = Some(now.clone());
            }
            (Some(now), None) => seen.reference = Some(now.clone()),
            (None, Some(then)) if change_reference => {
                changed_from = Some(then.clone());
                seen.reference = None;
            }
            _ => {}
        }
        Ok(Admission {
            seen,
            resumed_from: Some(dir),
            changed_from,
        })
    }

    /// What the stream has been so far (recorded in checkpoints).
    pub fn seen(&self) -> &StreamSeen {
        &self.seen
    }

    /// Checks a token batch against the stream (tokenizer and `seq_len`); the first batch of a
    /// fresh run fixes both. A difference from a checkpoint stops the run.
    pub fn batch(&mut self, b: &TokenBatch) -> Result<()> {
        let seq_len = b.window.saturating_sub(1);
        let differs = |item: &str, then: &dyn std::fmt::Display, now: &dyn std::fmt::Display| {
            let whose = match &self.resumed_from {
                Some(_) => "in the checkpoint",
                None => "earlier in this run",
            };
            let reason = format!("{item}: {then} {whose}, {now} now (batch {}): this is not the stream {}; resume only on the stream it was trained on, or start a new run", b.seq, if self.resumed_from.is_some() { "the checkpoint was trained on" } else { "the run started" });
            match &self.resumed_from {
                Some(dir) => TrainerError::checkpoint(dir, reason),
                None => TrainerError::Batch { seq: b.seq, reason },
            }
        };
        match &self.seen.tokenizer {
            Some(t) if *t != b.tokenizer => {
                return Err(differs("loader.tokenizer", t, &b.tokenizer))
            }
            Some(_) => {}
            None => self.seen.tokenizer = Some(b.tokenizer.clone()),
        }
        match self.seen.seq_len {
            Some(n) if n != seq_len => return Err(differs("loader.seq_len", &n, &seq_len)),
            Some(_) => {}
            None => self.seen.seq_len = Some(seq_len),
        }
        Ok(())
    }

    /// Checks a scored batch: the stream ([`Admission::batch`]), finite reference losses, and
    /// the run's one reference (the first scored batch fixes it when nothing else has).
    /// `Ok(Some(reason))` when this batch alone is refused (another selector can score it
    /// again); an error when the stream is not the checkpoint's.
    pub fn scored(&mut self, s: &ScoredBatch) -> Result<Option<String>> {
        self.batch(&s.batch)?;
        let seq = s.batch.seq;
        if let Some((row, pos, value)) = s.first_non_finite() {
            return Ok(Some(format!(
                "batch {seq}: the reference loss at row {row}, position {pos} is {value}, not a finite number (reference {})",
                s.ref_model
            )));
        }
        match &self.seen.reference {
            Some(r) if *r != s.ref_model => Ok(Some(format!(
                "batch {seq} was scored by the reference model {}, but this run's reference is {r}: one run trains against one reference (`selection.reference_fingerprint`, `selection.change_reference`)",
                s.ref_model
            ))),
            Some(_) => Ok(None),
            None => {
                match self.changed_from.take() {
                    Some(then) => tracing::warn!(checkpoint = %then, now = %s.ref_model, "the reference model changes on this resume (`selection.change_reference`)"),
                    None => tracing::info!(reference = %s.ref_model, seq, "the run's reference model"),
                }
                self.seen.reference = Some(s.ref_model.clone());
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(seq: u64, model: &[u8], losses: Vec<f32>) -> ScoredBatch {
        ScoredBatch {
            batch: TokenBatch {
                run_id: "r".into(),
                seq,
                epoch: 0,
                rows: 2,
                window: 4,
                tokenizer: Fingerprint::of_bytes(b"tok"),
                tokens: vec![1; 8],
                lengths: vec![4, 2],
                doc_starts: vec![vec![0]; 2],
            },
            ref_model: Fingerprint::of_bytes(model),
            ref_loss: losses,
        }
    }

    #[test]
    fn the_first_scored_batch_fixes_the_reference_and_another_is_refused() {
        let mut a = Admission::new(None, false, None).unwrap();
        assert_eq!(a.scored(&scored(0, b"a", vec![1.0; 6])).unwrap(), None);
        let refused = a.scored(&scored(1, b"b", vec![1.0; 6])).unwrap().unwrap();
        let why = refused.to_string();
        assert!(why.contains("batch 1"), "{why}");
        assert!(why.contains(Fingerprint::of_bytes(b"a").as_str()), "{why}");
        assert!(why.contains(Fingerprint::of_bytes(b"b").as_str()), "{why}");
        assert_eq!(a.scored(&scored(2, b"a", vec![1.0; 6])).unwrap(), None);
    }

    #[test]
    fn the_configured_reference_is_the_only_one() {
        let mut a = Admission::new(Some(Fingerprint::of_bytes(b"b")), false, None).unwrap();
        assert!(a.scored(&scored(0, b"a", vec![1.0; 6])).unwrap().is_some());
        assert_eq!(a.scored(&scored(0, b"b", vec![1.0; 6])).unwrap(), None);
    }

    #[test]
    fn non_finite_reference_losses_at_valid_positions_are_refused() {
        let mut a = Admission::new(None, false, None).unwrap();
        // Row 1 has one valid target (length 2): its positions 1 and 2 are padding.
        let mut padded = vec![1.0; 6];
        padded[4] = f32::NAN;
        padded[5] = f32::INFINITY;
        assert_eq!(a.scored(&scored(0, b"a", padded)).unwrap(), None);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut l = vec![1.0; 6];
            l[3] = bad;
            let why = a.scored(&scored(7, b"a", l)).unwrap().unwrap().to_string();
            assert!(
                why.contains("batch 7") && why.contains("row 1, position 0"),
                "{why}"
            );
        }
    }

    #[test]
    fn a_resumed_run_keeps_its_checkpoints_stream_and_reference() {
        let saved = StreamSeen {
            tokenizer: Some(Fingerprint::of_bytes(b"tok")),
            seq_len: Some(5),
            reference: Some(Fingerprint::of_bytes(b"a")),
        };
        let at = || Some((PathBuf::from("ck/step-00000003"), saved.clone()));
        let mut a = Admission::new(None, false, at()).unwrap();
        let err = a
            .scored(&scored(3, b"a", vec![1.0; 6]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("loader.seq_len: 5 in the checkpoint, 3 now"),
            "{err}"
        );

        let mut same = saved.clone();
        same.seq_len = Some(3);
        let at = || Some((PathBuf::from("ck"), same.clone()));
        let mut a = Admission::new(None, false, at()).unwrap();
        assert!(a.scored(&scored(3, b"b", vec![1.0; 6])).unwrap().is_some());
        // Another reference in the config is refused, unless the change is asked for.
        let other = Some(Fingerprint::of_bytes(b"b"));
        let err = Admission::new(other.clone(), false, at())
            .unwrap_err()
            .to_string();
        assert!(err.contains("selection.change_reference"), "{err}");
        let mut a = Admission::new(other, true, at()).unwrap();
        assert_eq!(a.scored(&scored(3, b"b", vec![1.0; 6])).unwrap(), None);
        // A change without a named reference takes the first scored batch's.
        let mut a = Admission::new(None, true, at()).unwrap();
        assert_eq!(a.scored(&scored(3, b"c", vec![1.0; 6])).unwrap(), None);
        assert_eq!(a.seen().reference, Some(Fingerprint::of_bytes(b"c")));
    }
}
