//! Token selection, the heart of Selective Language Modeling (Rho-1, Eq. 4).
//!
//! Every valid target position gets a score; the top `ratio` of positions by score are kept
//! (over the whole step's batch, or within each sequence), and the loss is the mean
//! cross-entropy over the kept positions. The backends share this module, so that every
//! backend selects the same tokens from the same numbers.
//!
//! Conventions that make selection exact and reproducible:
//! - the number kept from `n` valid positions is `round_half_up(ratio * n)`, so `ratio = 0`
//!   keeps none and `ratio = 1` keeps all;
//! - higher score is kept first; equal scores are broken by position (earlier first, row-major);
//!   so exactly `k` are kept whatever the ties: where several positions share the `k`-th
//!   highest score, the earliest of them fill the places left, and the later ones are not kept
//!   (with every score equal, as when the reference is the model itself, the first `k` valid
//!   positions of the scope are kept);
//! - invalid positions (padding, masked) are never kept and never counted in `n`;
//! - a NaN score ranks below every number;
//! - the `random` rule scores position `i` of a step (row-major) with
//!   [`random_score`]`(random_key(seed, step), i)`: uniform in [0, 1), the same on every backend.

pub use rho_common::mix64;
use serde::{Deserialize, Serialize};

/// What ranks the tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScoreRule {
    /// `L_theta - L_ref`, the paper's: tokens the model has not learned but the reference has.
    #[default]
    Excess,
    /// `-L_ref`: the tokens the reference model finds easiest.
    Reference,
    /// `L_theta`: the tokens the current model finds hardest (no reference needed).
    Current,
    /// A uniformly random score per position, from `Selection::seed`, the step and the
    /// position: a control that trains on as many tokens without choosing them (no reference
    /// needed, reproducible).
    Random,
    /// No selection: every valid token (plain causal LM).
    None,
}

impl ScoreRule {
    /// The rule's name in configs: `excess`, `reference`, `current`, `random` or `none`.
    pub fn name(self) -> &'static str {
        match self {
            ScoreRule::Excess => "excess",
            ScoreRule::Reference => "reference",
            ScoreRule::Current => "current",
            ScoreRule::Random => "random",
            ScoreRule::None => "none",
        }
    }

    /// Whether the rule needs reference losses.
    pub fn needs_reference(self) -> bool {
        matches!(self, ScoreRule::Excess | ScoreRule::Reference)
    }
}

/// Over which tokens the top-k is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// All tokens of the step's batch (the paper's).
    #[default]
    Batch,
    /// Each sequence alone.
    Sequence,
}

/// How the ratio evolves over training steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RatioSchedule {
    /// The same ratio at every step.
    Constant {
        /// The share of tokens kept.
        ratio: f64,
    },
    /// Every token for the first `steps` steps (plain causal LM), then `ratio`.
    CausalThen {
        /// Steps of plain causal LM first (every token kept).
        steps: u64,
        /// The share of tokens kept.
        ratio: f64,
    },
}

impl Default for RatioSchedule {
    fn default() -> Self {
        RatioSchedule::Constant { ratio: 0.6 }
    }
}

impl RatioSchedule {
    /// The ratio at `step` (0-based).
    pub fn ratio(&self, step: u64) -> f64 {
        match *self {
            RatioSchedule::Constant { ratio } => ratio,
            RatioSchedule::CausalThen { steps, ratio } => {
                if step < steps {
                    1.0
                } else {
                    ratio
                }
            }
        }
    }

    /// Checks the ratio lies in [0, 1].
    pub fn validate(&self) -> Result<(), String> {
        let r = match *self {
            RatioSchedule::Constant { ratio } | RatioSchedule::CausalThen { ratio, .. } => ratio,
        };
        if (0.0..=1.0).contains(&r) {
            Ok(())
        } else {
            Err(format!("ratio {r} is outside [0, 1]"))
        }
    }
}

/// The selection settings of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    /// How a token is scored.
    #[serde(default)]
    pub score: ScoreRule,
    /// Over what the top-k is taken.
    #[serde(default)]
    pub scope: Scope,
    /// The share of tokens kept, by step.
    #[serde(default)]
    pub schedule: RatioSchedule,
    /// The seed of the `random` rule (ignored by the others).
    #[serde(default)]
    pub seed: u64,
    /// The reference model this run's scores must come from (the `sha256:` fingerprint a
    /// selector logs and stamps on every scored batch). Unset, the run takes the reference of
    /// its first scored batch, or of its checkpoint when it resumes; either way a batch scored
    /// by another reference is refused, never trained on.
    #[serde(default)]
    pub reference_fingerprint: Option<rho_protocol::Fingerprint>,
    /// On resume, take `reference_fingerprint` (or the first scored batch's reference) even
    /// where the checkpoint was trained against another one: a deliberate change of reference,
    /// logged. Default false: a checkpoint's reference is the run's.
    #[serde(default)]
    pub change_reference: bool,
}

/// How many of `n` valid positions a ratio keeps.
pub fn keep_count(ratio: f64, n: usize) -> usize {
    ((ratio * n as f64) + 0.5).floor().clamp(0.0, n as f64) as usize
}

/// The per-position score under a rule (higher is kept first); `random` is `random_score(key,
/// position)`.
pub fn score(rule: ScoreRule, current: f32, reference: f32, key: u64, position: usize) -> f32 {
    match rule {
        ScoreRule::Excess => current - reference,
        ScoreRule::Reference => -reference,
        ScoreRule::Current => current,
        ScoreRule::Random => random_score(key, position),
        ScoreRule::None => 0.0,
    }
}

/// The key of step `step`'s random scores under `seed`: `mix64(seed ^ mix64(step))`.
pub fn random_key(seed: u64, step: u64) -> u64 {
    mix64(seed ^ mix64(step))
}

/// The random score of `position` (row-major within the step): the top 24 bits of
/// `mix64(key ^ position)` over 2^24, uniform in [0, 1) and exact in f32.
pub fn random_score(key: u64, position: usize) -> f32 {
    (mix64(key ^ position as u64) >> 40) as f32 / (1u64 << 24) as f32
}

/// The per-position losses of one step: `rows` sequences of `len` target positions, row-major.
#[derive(Debug, Clone, Copy)]
pub struct Losses<'a> {
    /// Sequences.
    pub rows: usize,
    /// Target positions per sequence.
    pub len: usize,
    /// The model's own loss `L_theta` of every position.
    pub current: &'a [f32],
    /// The reference loss `L_ref` of every position, when scored.
    pub reference: Option<&'a [f32]>,
    /// Whether a position may be selected at all (not padding).
    pub valid: &'a [bool],
}

impl Selection {
    /// The selection mask of step `step` (its ratio from the schedule, its random key from the
    /// seed); see [`select_keyed`].
    pub fn mask(&self, step: u64, losses: &Losses) -> Vec<f32> {
        select_keyed(
            self.score,
            self.scope,
            self.schedule.ratio(step),
            losses,
            random_key(self.seed, step),
        )
    }
}

/// [`select_keyed`] with random key 0.
pub fn select(rule: ScoreRule, scope: Scope, ratio: f64, losses: &Losses) -> Vec<f32> {
    select_keyed(rule, scope, ratio, losses, 0)
}

/// The selection mask of a step under `rule`, `scope` and `ratio`: 1.0 for kept positions,
/// row-major like `losses`. Within each scope the `round(ratio * valid)` highest-scoring valid
/// positions are kept (ties by position, NaN scores last); the rule `none` keeps every valid
/// position; `random` scores with `key` (see [`random_score`]). This is the function the
/// selection vectors pin down, mirrored by the Python consumer.
pub fn select_keyed(
    rule: ScoreRule,
    scope: Scope,
    ratio: f64,
    losses: &Losses,
    key: u64,
) -> Vec<f32> {
    let Losses {
        rows,
        len,
        current,
        reference,
        valid,
    } = *losses;
    let n = rows * len;
    let mut mask = vec![0f32; n];
    let scores: Vec<f32> = (0..n)
        .map(|i| score(rule, current[i], reference.map_or(0.0, |r| r[i]), key, i))
        .collect();
    let mut pick = |positions: Vec<usize>| {
        let k = if rule == ScoreRule::None {
            positions.len()
        } else {
            keep_count(ratio, positions.len())
        };
        let mut order = positions;
        order.sort_by(|&a, &b| {
            let (sa, sb) = (scores[a], scores[b]);
            // Descending by score, NaN last; ties by position.
            match (sa.is_nan(), sb.is_nan()) {
                (true, true) => a.cmp(&b),
                (true, false) => std::cmp::Ordering::Greater,
                (false, true) => std::cmp::Ordering::Less,
                _ => sb
                    .partial_cmp(&sa)
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(a.cmp(&b)),
            }
        });
        for &i in order.iter().take(k) {
            mask[i] = 1.0;
        }
    };
    match scope {
        Scope::Batch => pick((0..n).filter(|&i| valid[i]).collect()),
        Scope::Sequence => {
            for r in 0..rows {
                pick((r * len..(r + 1) * len).filter(|&i| valid[i]).collect());
            }
        }
    }
    mask
}

/// Mean of `losses` over the kept positions (those with a non-zero mask; what is not kept
/// never contributes, not even a NaN); 0 when none is kept.
pub fn masked_mean(losses: &[f32], mask: &[f32]) -> f32 {
    let (sum, count) = losses
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m != 0.0)
        .fold((0f64, 0f64), |(s, c), (&l, &m)| {
            (s + f64::from(l * m), c + f64::from(m))
        });
    if count == 0.0 {
        0.0
    } else {
        (sum / count) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Case {
        name: &'static str,
        rule: ScoreRule,
        scope: Scope,
        ratio: f64,
        rows: usize,
        current: Vec<f32>,
        reference: Vec<f32>,
        valid: Vec<bool>,
        mask: Vec<f32>,
        loss: f32,
    }

    fn cases() -> Vec<Case> {
        let all = vec![true; 6];
        vec![
            Case {
                name: "excess, batch, k = 0.5: the three largest L - Lref",
                rule: ScoreRule::Excess,
                scope: Scope::Batch,
                ratio: 0.5,
                rows: 2,
                current: vec![3.0, 1.0, 4.0, 1.0, 5.0, 9.0],
                reference: vec![1.0, 1.0, 1.0, 0.5, 5.0, 2.0],
                // excess: 2, 0, 3, 0.5, 0, 7 -> keep 5 (7), 2 (3), 0 (2)
                valid: all.clone(),
                mask: vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0],
                loss: (3.0 + 4.0 + 9.0) / 3.0,
            },
            Case {
                name: "ties broken by position",
                rule: ScoreRule::Excess,
                scope: Scope::Batch,
                ratio: 0.5,
                rows: 1,
                current: vec![2.0, 2.0, 2.0, 2.0, 1.0, 1.0],
                reference: vec![1.0; 6],
                valid: all.clone(),
                mask: vec![1.0, 1.0, 1.0, 0.0, 0.0, 0.0],
                loss: 2.0,
            },
            Case {
                name: "k = 0 keeps nothing",
                rule: ScoreRule::Excess,
                scope: Scope::Batch,
                ratio: 0.0,
                rows: 2,
                current: vec![1.0; 6],
                reference: vec![0.0; 6],
                valid: all.clone(),
                mask: vec![0.0; 6],
                loss: 0.0,
            },
            Case {
                name: "k = 1 keeps every valid position, never padding",
                rule: ScoreRule::Excess,
                scope: Scope::Batch,
                ratio: 1.0,
                rows: 2,
                current: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                reference: vec![0.0; 6],
                valid: vec![true, true, false, true, true, false],
                mask: vec![1.0, 1.0, 0.0, 1.0, 1.0, 0.0],
                loss: 3.0,
            },
            Case {
                name: "a ratio that does not divide: 0.6 of 4 valid = round(2.4) = 2",
                rule: ScoreRule::Current,
                scope: Scope::Batch,
                ratio: 0.6,
                rows: 2,
                current: vec![0.5, 9.0, 7.0, 1.0, 8.0, 100.0],
                reference: vec![0.0; 6],
                valid: vec![true, true, false, true, true, false],
                mask: vec![0.0, 1.0, 0.0, 0.0, 1.0, 0.0],
                loss: 8.5,
            },
            Case {
                name: "per-sequence scope: k within each row",
                rule: ScoreRule::Excess,
                scope: Scope::Sequence,
                ratio: 1.0 / 3.0,
                rows: 2,
                current: vec![5.0, 6.0, 7.0, 1.0, 2.0, 3.0],
                reference: vec![0.0; 6],
                valid: all.clone(),
                // batch scope would keep 7 and 6; each row keeps its best
                mask: vec![0.0, 0.0, 1.0, 0.0, 0.0, 1.0],
                loss: 5.0,
            },
            Case {
                name: "reference rule keeps the lowest reference losses",
                rule: ScoreRule::Reference,
                scope: Scope::Batch,
                ratio: 0.5,
                rows: 1,
                current: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                reference: vec![0.3, 5.0, 0.1, 4.0, 0.2, 9.0],
                valid: all.clone(),
                mask: vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0],
                loss: 3.0,
            },
            Case {
                name: "none keeps every valid token whatever the ratio",
                rule: ScoreRule::None,
                scope: Scope::Batch,
                ratio: 0.1,
                rows: 1,
                current: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                reference: vec![0.0; 6],
                valid: vec![true, true, true, true, false, false],
                mask: vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0],
                loss: 2.5,
            },
            Case {
                name: "NaN scores rank last",
                rule: ScoreRule::Current,
                scope: Scope::Batch,
                ratio: 0.5,
                rows: 1,
                current: vec![f32::NAN, 1.0, 2.0, f32::NAN, 0.5, 3.0],
                reference: vec![0.0; 6],
                valid: all,
                mask: vec![0.0, 1.0, 1.0, 0.0, 0.0, 1.0],
                loss: 2.0,
            },
        ]
    }

    #[test]
    fn hand_computed_masks_and_losses() {
        for c in cases() {
            let len = c.current.len() / c.rows;
            let mask = select(
                c.rule,
                c.scope,
                c.ratio,
                &Losses {
                    rows: c.rows,
                    len,
                    current: &c.current,
                    reference: Some(&c.reference),
                    valid: &c.valid,
                },
            );
            assert_eq!(mask, c.mask, "{}", c.name);
            let loss = masked_mean(&c.current, &mask);
            assert!(
                (loss - c.loss).abs() < 1e-6,
                "{}: loss {loss} != {}",
                c.name,
                c.loss
            );
        }
    }

    #[test]
    fn keep_counts_round_half_up() {
        assert_eq!(keep_count(0.6, 10), 6);
        assert_eq!(keep_count(0.6, 4), 2);
        assert_eq!(keep_count(0.5, 5), 3);
        assert_eq!(keep_count(0.0, 7), 0);
        assert_eq!(keep_count(1.0, 7), 7);
        assert_eq!(keep_count(0.7, 0), 0);
    }

    #[test]
    fn schedules() {
        let s = RatioSchedule::CausalThen {
            steps: 3,
            ratio: 0.6,
        };
        assert_eq!((s.ratio(0), s.ratio(2), s.ratio(3)), (1.0, 1.0, 0.6));
        assert!(RatioSchedule::Constant { ratio: 1.5 }.validate().is_err());
        let parsed: Selection = serde_json::from_str(r#"{"score":"excess","scope":"sequence","schedule":{"kind":"causal_then","steps":100,"ratio":0.7}}"#).unwrap();
        assert_eq!(parsed.scope, Scope::Sequence);
        assert_eq!(parsed.schedule.ratio(100), 0.7);
    }

    #[test]
    fn the_random_rule_keeps_k_uniformly_and_reproducibly() {
        let sel = |seed| Selection {
            score: ScoreRule::Random,
            scope: Scope::Batch,
            schedule: RatioSchedule::Constant { ratio: 0.25 },
            seed,
            ..Selection::default()
        };
        let (rows, len) = (16, 256);
        let n = rows * len;
        // The losses do not matter: the model's hardest tokens are not preferred.
        let current: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let valid = vec![true; n];
        let losses = Losses {
            rows,
            len,
            current: &current,
            reference: None,
            valid: &valid,
        };
        let a = sel(3).mask(10, &losses);
        assert_eq!(a.iter().sum::<f32>(), keep_count(0.25, n) as f32);
        assert_eq!(a, sel(3).mask(10, &losses), "same seed and step, same mask");
        assert_ne!(a, sel(3).mask(11, &losses), "another step, another mask");
        assert_ne!(a, sel(4).mask(10, &losses), "another seed, another mask");
        // Spread over positions: each quarter of the batch gets about a quarter of the kept.
        for q in 0..4 {
            let kept: f32 = a[q * n / 4..(q + 1) * n / 4].iter().sum();
            assert!((200.0..=312.0).contains(&kept), "quarter {q} kept {kept}");
        }
        let mean = (0..n).map(|i| f64::from(random_score(7, i))).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.02, "mean score {mean}");
        assert!(!ScoreRule::Random.needs_reference());
        let parsed: Selection = serde_json::from_str(
            r#"{"score":"random","seed":9,"schedule":{"kind":"constant","ratio":0.6}}"#,
        )
        .unwrap();
        assert_eq!((parsed.score, parsed.seed), (ScoreRule::Random, 9));
    }
}
