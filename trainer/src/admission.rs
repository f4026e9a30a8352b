//! What a batch must be before the trainer takes it into its stream.
//!
//! Rules, checked on every batch as it arrives (before it is buffered):
//! - **one reference per run**: the run's reference model is `selection.reference_fingerprint`
//!   when the config names one, else the checkpoint's on resume, else the first scored batch's;
//!   a scored batch of another reference is refused;
//! - **finite reference losses**: a NaN or an infinity at a valid position is refused;
//! - **the checkpoint's stream**: a resumed run's batches come from the stream its checkpoint
//!   was trained on (the stream identity its loader stamps on every batch: tokenizer, the
//!   loader settings that shape the stream, the corpus); a difference stops the run with every
//!   changed item named, unless the config accepts that item (`accept_stream_changes`). The
//!   first batch of a fresh run fixes the stream, and a later batch of another stream (a loader
//!   restarted with another config) stops the run too.
//!
//! A refused batch is not trained on and not acknowledged: its lease hands it out again, to a
//! selector that scores it with the run's reference.

use std::path::PathBuf;

use rho_protocol::{Difference, Fingerprint, ScoredBatch, StreamIdentity, TokenBatch};

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
    /// Stream items whose change from the checkpoint's is accepted (`accept_stream_changes`).
    accepted: Vec<String>,
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
            accepted: Vec::new(),
        })
    }

    /// Accepts a change of these stream items from the checkpoint's (names of
    /// [`rho_protocol::STREAM_ITEMS`]; each accepted change is logged).
    pub fn accepting(mut self, items: &[String]) -> Self {
        self.accepted = items.to_vec();
        self
    }

    /// The stream a resume's cursor belongs to, for the loader to check; none where this run
    /// accepts changes (it checks them itself) or knows no identity yet.
    pub fn cursor_stream(&self) -> Option<StreamIdentity> {
        match self.accepted.is_empty() {
            true => self.seen.loader.clone(),
            false => None,
        }
    }

    /// What the stream has been so far (recorded in checkpoints).
    pub fn seen(&self) -> &StreamSeen {
        &self.seen
    }

    /// Checks a token batch against the stream: its stream identity where its loader stamped
    /// one, else its tokenizer and `seq_len`. The first batch of a fresh run fixes the stream;
    /// a difference from a checkpoint's stream (not accepted by `accept_stream_changes`), or
    /// from the stream earlier in this run, stops the run with every changed item named.
    pub fn batch(&mut self, b: &TokenBatch) -> Result<()> {
        let seq_len = b.window.saturating_sub(1);
        // The batch of every step: the stream it already knows, compared without a copy.
        let known = self.seen.tokenizer.as_ref() == Some(&b.tokenizer)
            && self.seen.seq_len == Some(seq_len)
            && b.stream
                .as_deref()
                .is_none_or(|now| self.seen.loader.as_ref() == Some(now));
        if known {
            return Ok(());
        }
        let whose = match &self.resumed_from {
            Some(_) => "in the checkpoint",
            None => "earlier in this run",
        };
        let mut differences = match (&self.seen.loader, &b.stream) {
            (Some(then), Some(now)) => then.differences(now),
            _ => Vec::new(),
        };
        if b.stream.is_none() || self.seen.loader.is_none() {
            // What the batch itself shows, where no identity compares.
            if let Some(t) = self.seen.tokenizer.as_ref().filter(|t| **t != b.tokenizer) {
                differences.push(Difference {
                    item: "loader.tokenizer",
                    then: t.to_string(),
                    now: b.tokenizer.to_string(),
                });
            }
            if let Some(n) = self.seen.seq_len.filter(|n| *n != seq_len) {
                differences.push(Difference {
                    item: "loader.seq_len",
                    then: n.to_string(),
                    now: seq_len.to_string(),
                });
            }
        }
        let refused: Vec<Difference> = differences
            .iter()
            .filter(|d| self.resumed_from.is_none() || !self.accepted.iter().any(|a| a == d.item))
            .cloned()
            .collect();
        if !refused.is_empty() {
            let what = rho_protocol::describe_differences(&refused, whose, "now");
            return Err(match &self.resumed_from {
                Some(dir) => TrainerError::checkpoint(dir, format!("batch {} is not of the stream this checkpoint was trained on: {what}; resume only on that stream, list the items in `accept_stream_changes` to accept these changes, or start a new run", b.seq)),
                None => TrainerError::Batch {
                    seq: b.seq,
                    reason: format!("not of the stream this run started on: {what} (a loader restarted with another config?)"),
                },
            });
        }
        if !differences.is_empty() {
            let accepted = rho_protocol::describe_differences(&differences, whose, "now");
            tracing::warn!(
                seq = b.seq,
                "the stream changes on this resume (`accept_stream_changes`): {accepted}"
            );
        }
        self.seen.tokenizer = Some(b.tokenizer.clone());
        self.seen.seq_len = Some(seq_len);
        if let Some(now) = &b.stream {
            self.seen.loader = Some(now.as_ref().clone());
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
                stream: None,
                rank: None,
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
            loader: None,
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

    fn identity(seq_len: u64, shards: u64) -> StreamIdentity {
        StreamIdentity {
            tokenizer: Fingerprint::of_bytes(b"tok"),
            seq_len,
            batch_size: 2,
            seed: 0,
            shuffle_window: 64,
            add_bos: false,
            add_eos: true,
            bos_token: None,
            eos_token: None,
            text_field: "text".into(),
            format: "auto".into(),
            max_doc_bytes: 1 << 20,
            corpus: rho_protocol::Corpus {
                shards,
                bytes: 10 * shards,
                digest: Fingerprint::of_bytes(&shards.to_be_bytes()),
            },
        }
    }

    #[test]
    fn a_resume_on_another_stream_names_every_change_unless_accepted() {
        let saved = StreamSeen {
            tokenizer: Some(Fingerprint::of_bytes(b"tok")),
            seq_len: Some(3),
            reference: None,
            loader: Some(identity(3, 2)),
        };
        let at = || Some((PathBuf::from("ck"), saved.clone()));
        let mut batch = scored(3, b"a", vec![1.0; 6]).batch;
        batch.stream = Some(Box::new(identity(3, 3)));
        let err = Admission::new(None, false, at())
            .unwrap()
            .batch(&batch)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("loader.data.paths: 2 shards of 20 bytes"),
            "{err}"
        );
        assert!(err.contains("3 shards of 30 bytes"), "{err}");
        let mut a = Admission::new(None, false, at())
            .unwrap()
            .accepting(&["loader.data.paths".into()]);
        assert_eq!(
            a.cursor_stream(),
            None,
            "the trainer checks accepted changes itself"
        );
        a.batch(&batch).unwrap();
        assert_eq!(a.seen().loader, Some(identity(3, 3)));
        // Accepting one item does not accept another.
        let mut other = batch.clone();
        other.stream = Some(Box::new(identity(3, 4)));
        other.stream.as_mut().unwrap().seed = 9;
        let mut a = Admission::new(None, false, at())
            .unwrap()
            .accepting(&["loader.data.paths".into()]);
        let err = a.batch(&other).unwrap_err().to_string();
        assert!(
            err.contains("loader.seed: 0 in the checkpoint, 9 now"),
            "{err}"
        );
        assert!(!err.contains("loader.data.paths"), "{err}");
        // Within one run, another stream stops the run whatever is accepted.
        let mut fresh = Admission::new(None, false, None).unwrap();
        fresh.batch(&batch).unwrap();
        assert!(fresh.batch(&other).is_err());
    }
}
