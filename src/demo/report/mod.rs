//! The report of `rho demo`: numbers (`report.json`, `report.md`), loss curves (`loss.svg`,
//! `loss.png`), the token-selection page (`selection.html`), and the compute each run took,
//! counted in full (the reference's scoring and its own training too).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::plan::Plan;
use crate::report::chart::{Chart, Series};
use crate::report::selection::{page, score_docs, Packing, ScoredDocs, RULES};
use crate::report::tokens_to_reach;
use crate::supervise::RunOutcome;
use crate::synth::{Doc, NoiseKind};
use rho_trainer::ScoreRule;

pub struct Inputs<'a> {
    pub out: &'a Path,
    pub plan: &'a Plan,
    pub seed: u64,
    pub tokenizer: &'a Path,
    pub reference_model: &'a Path,
    pub slm_model: &'a Path,
    /// Reference, causal, SLM.
    pub runs: [&'a RunOutcome; 3],
    /// The other score rules' runs (`--ablations`), same start, stream, budget and k as SLM.
    pub ablations: Vec<(ScoreRule, &'a RunOutcome)>,
    /// Documents of the noisy training corpus with their noise spans (synthetic data only).
    pub sample_docs: Option<&'a [Doc]>,
    pub started: Instant,
}

/// `(tokens read, held-out loss)` of a run's evaluations.
fn curve(run: &RunOutcome, plan: &Plan) -> Vec<(f64, f64)> {
    let per_step = (plan.batch * plan.seq_len) as f64;
    let evals = run.summary.trainer.as_ref().map(|t| t.evals.as_slice());
    evals
        .unwrap_or_default()
        .iter()
        .map(|e| (e.step as f64 * per_step, f64::from(e.loss)))
        .collect()
}

/// Throughput of the processes of one run, from their reports.
fn throughput(run: &RunOutcome, plan: &Plan) -> Throughput {
    let t = run.summary.trainer.clone().unwrap_or_default();
    let read = t.steps as f64 * (plan.batch * plan.seq_len) as f64;
    let selector: Option<rho_selector::Report> =
        std::fs::read_to_string(run.dir.join("selector-0.report.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok());
    let peak = |samples: &[(f64, u64)]| samples.iter().map(|s| s.1).max().unwrap_or(0);
    Throughput {
        trainer_tokens_per_s: if t.wall_secs > 0.0 {
            read / t.wall_secs
        } else {
            0.0
        },
        trainer_data_wait_fraction: t.data_wait_fraction,
        trainer_wall_seconds: t.wall_secs,
        selector_tokens_per_s: selector.map(|s| s.tokens as f64 / s.score_secs.max(1e-9)),
        loader_tokens_per_s: run.summary.loader.as_ref().map(|l| l.tokens_per_s),
        pipeline_wall_seconds: run.summary.wall_seconds,
        peak_resident_mib: run
            .memory
            .iter()
            .map(|(process, samples)| (process.clone(), peak(samples) as f64 / 1024.0))
            .collect(),
    }
}

/// Selection by every rule of [`RULES`] over packed windows of `docs`, with the final SLM
/// model as the current model: how much of what each keeps is noise, easy or hard clean text.
fn selection_analysis(inp: &Inputs, docs: &[Doc]) -> anyhow::Result<(Selection, String)> {
    let plan = inp.plan;
    let packing = Packing {
        ratio: plan.ratio,
        rows: plan.batch,
        len: plan.seq_len,
        batches: if plan.quick() { 2 } else { 12 },
    };
    let sd = score_docs(
        inp.tokenizer,
        inp.reference_model,
        inp.slm_model,
        docs,
        &packing,
    )?;
    let analysis = noise_shares(docs, &sd, plan.ratio);
    let mut intro = format!(
        "<p>Noise among all tokens: <b>{:.1}%</b>; easy text: <b>{:.1}%</b>. Current model: the SLM model at the end of training; \
         selection of {:.0}% over batches of {} x {} tokens, as in training.</p>\n<table><tr><th>rule</th><th>noise among kept</th><th>easy among kept</th><th>hard clean tokens kept</th></tr>",
        analysis.noise_share_of_corpus * 100.0,
        analysis.easy_share_of_corpus * 100.0,
        plan.ratio * 100.0,
        plan.batch,
        plan.seq_len
    );
    for rule in RULES {
        let name = rule.name();
        let _ = write!(
            intro,
            "<tr><td>{name}</td><td>{:.1}%</td><td>{:.1}%</td><td>{:.1}%</td></tr>",
            analysis.noise_share_selected[name] * 100.0,
            analysis.easy_share_selected[name] * 100.0,
            analysis.by_kind.get("clean").map_or(0.0, |k| k.kept[name]) * 100.0,
        );
    }
    intro.push_str("</table>");
    Ok((analysis, page(docs, &sd, &intro, 8, true)))
}

/// Shares of noise and easy text among the scored tokens, overall and per kind, and among what
/// each rule keeps.
fn noise_shares(docs: &[Doc], sd: &ScoredDocs, ratio: f64) -> Selection {
    let kinds = [
        NoiseKind::Id,
        NoiseKind::Url,
        NoiseKind::Boilerplate,
        NoiseKind::Shuffled,
        NoiseKind::WrongResult,
    ];
    // Slots: the noise kinds, then `easy`, then `clean` (hard clean text).
    let (easy_slot, clean_slot) = (kinds.len(), kinds.len() + 1);
    let mut tokens = vec![0usize; kinds.len() + 2];
    let mut kept = vec![[0usize; RULES.len()]; kinds.len() + 2];
    for (i, s) in sd.scored.iter().enumerate() {
        let Some(s) = s else { continue };
        let (d, start, end) = sd.origin[i];
        let slot = match docs[d].noise_kind(start, end) {
            Some(k) => kinds.iter().position(|&x| x == k).unwrap_or(0),
            None if docs[d].is_easy(start, end) => easy_slot,
            None => clean_slot,
        };
        tokens[slot] += 1;
        for (r, &k) in s.kept.iter().enumerate() {
            kept[slot][r] += usize::from(k);
        }
    }
    let share = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let n: usize = tokens.iter().sum();
    let noise: usize = tokens[..kinds.len()].iter().sum();
    let kept_by = |r: usize, slots: std::ops::Range<usize>| -> usize {
        kept[slots].iter().map(|k| k[r]).sum()
    };
    let all = 0..kinds.len() + 2;
    let by_rule = |f: &dyn Fn(usize) -> f64| -> std::collections::BTreeMap<String, f64> {
        RULES
            .iter()
            .enumerate()
            .map(|(r, rule)| (rule.name().to_string(), f(r)))
            .collect()
    };
    let noise_selected = by_rule(&|r| share(kept_by(r, 0..kinds.len()), kept_by(r, all.clone())));
    let easy_selected = by_rule(&|r| {
        share(
            kept_by(r, easy_slot..easy_slot + 1),
            kept_by(r, all.clone()),
        )
    });
    let mut by_kind = std::collections::BTreeMap::new();
    for slot in 0..kinds.len() + 2 {
        let name = match slot {
            s if s == easy_slot => "easy",
            s if s == clean_slot => "clean",
            s => kinds[s].name(),
        };
        let entry = KindShare {
            tokens: tokens[slot],
            kept_by_excess: share(kept[slot][0], tokens[slot]),
            kept_by_reference: share(kept[slot][1], tokens[slot]),
            kept: by_rule(&|r| share(kept[slot][r], tokens[slot])),
        };
        by_kind.insert(name.to_string(), entry);
    }
    let used = &docs[..sd.used_docs];
    Selection {
        tokens: n,
        documents: sd.used_docs,
        ratio,
        current_model: "the SLM model at the end of training".into(),
        noise_share_of_corpus: share(noise, n),
        noise_share_of_corpus_bytes: share(
            used.iter().map(Doc::noise_bytes).sum(),
            used.iter().map(|d| d.text.len()).sum(),
        ),
        easy_share_of_corpus: share(tokens[easy_slot], n),
        noise_share_selected_by_excess: noise_selected["excess"],
        noise_share_selected_by_reference: noise_selected["reference"],
        noise_share_selected: noise_selected,
        easy_share_selected: easy_selected,
        by_kind,
    }
}

/// `report.json` of a demo.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub seed: u64,
    pub causal_final_eval_loss: f64,
    pub slm_final_eval_loss: f64,
    pub slm_minus_causal: f64,
    pub reference_final_eval_loss: Option<f64>,
    /// Share of the token budget the SLM run read before its held-out loss first reached the
    /// causal LM's final loss (at an evaluation); `None` when it never did.
    pub slm_tokens_to_causal_final_fraction: Option<f64>,
    /// The same, interpolated linearly between the evaluations around it.
    pub slm_tokens_to_causal_final_fraction_interpolated: Option<f64>,
    pub tokens_per_run: u64,
    pub steps_per_run: u64,
    pub reference_steps: u64,
    pub eval_every_steps: u64,
    pub eval_tokens: usize,
    /// The model preset.
    pub model: String,
    /// `[rows, positions]` of a batch.
    pub batch: [usize; 2],
    pub ratio: f64,
    pub wall_seconds: f64,
    pub evals: Evals,
    /// Every target run by its score rule: causal LM (`none`), SLM (`excess`) and, with
    /// `--ablations`, `reference`, `current` and `random`.
    pub rules: Vec<RuleRun>,
    /// The compute of the runs, counted in full.
    pub compute: Compute,
    /// What each rule selects of the noise (synthetic data only).
    pub selection: Option<Selection>,
    pub throughput: ByRun<Throughput>,
    pub runs: ByRun<std::path::PathBuf>,
}

/// Held-out loss by tokens read, of both target runs and of the ablations.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evals {
    pub causal: Vec<EvalAt>,
    pub slm: Vec<EvalAt>,
    /// By rule, the runs of `--ablations`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub ablations: std::collections::BTreeMap<String, Vec<EvalAt>>,
}

/// One target run under one score rule, against causal LM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleRun {
    /// `none` (causal LM), `excess` (SLM), `reference`, `current` or `random`.
    pub rule: ScoreRule,
    /// The run's directory under `runs/`.
    pub run: String,
    pub final_eval_loss: f64,
    pub minus_causal: f64,
    /// Share of the token budget read before the held-out loss first reached causal LM's
    /// final loss (at an evaluation); `None` when it never did.
    pub tokens_to_causal_final_fraction: Option<f64>,
    /// The same, interpolated between evaluations.
    pub tokens_to_causal_final_fraction_interpolated: Option<f64>,
    /// Share of noise among what the rule keeps (the selection analysis), synthetic data only.
    pub noise_share_kept: Option<f64>,
    /// FLOPs of the whole run: `6 N` per token of every batch (the trainer's forward and
    /// backward pass cover the whole batch; the mask only zeroes the loss of what is left out),
    /// plus `2 N_ref` per token scored by the reference when the rule needs it.
    pub flops: f64,
    /// `flops` up to where the held-out loss reached causal LM's final (interpolated).
    pub flops_to_causal_final: Option<f64>,
    /// `flops_to_causal_final` over causal LM's `flops`.
    pub compute_to_causal_final_ratio: Option<f64>,
    /// The same with the reference's own training added, when the rule uses the reference.
    pub compute_to_causal_final_ratio_with_reference_training: Option<f64>,
    /// Wall time of the whole pipeline (`rho run`: loader, selectors, trainer).
    pub pipeline_wall_seconds: f64,
}

/// Compute, counted in FLOPs as `6 N` per trained token and `2 N` per scored token, where `N`
/// counts the weights a token meets in a matrix product (attention scores left out).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Compute {
    /// `N` of the target models.
    pub target_parameters: usize,
    /// `N_ref` of the reference model.
    pub reference_parameters: usize,
    /// Training the reference: `6 N_ref` per token it read.
    pub reference_training_flops: f64,
    /// Causal LM's run: `6 N` per token.
    pub causal_flops: f64,
    /// SLM's run: `6 N` per token read plus `2 N_ref` per token scored.
    pub slm_flops: f64,
    /// SLM's trained tokens alone, as the paper counts them: `6 N` per kept token.
    pub slm_selected_token_flops: f64,
    /// SLM's compute to reach causal LM's final held-out loss, over causal LM's total.
    pub slm_to_causal_final_ratio: Option<f64>,
    /// The same with the reference's training added to SLM's side.
    pub slm_to_causal_final_ratio_with_reference_training: Option<f64>,
    /// Wall time of the reference's training pipeline.
    pub reference_wall_seconds: f64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct EvalAt {
    pub tokens: f64,
    pub loss: f64,
}

/// One value for each of the three runs, and for each ablation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ByRun<T> {
    pub reference: T,
    pub causal: T,
    pub slm: T,
    /// By rule, the runs of `--ablations`.
    #[serde(
        default = "std::collections::BTreeMap::new",
        skip_serializing_if = "std::collections::BTreeMap::is_empty"
    )]
    pub ablations: std::collections::BTreeMap<String, T>,
}

/// Throughput and memory of the processes of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Throughput {
    /// Tokens read over the trainer's wall time.
    pub trainer_tokens_per_s: f64,
    pub trainer_data_wait_fraction: f64,
    pub trainer_wall_seconds: f64,
    /// Tokens over the time in the model, of the first selector.
    pub selector_tokens_per_s: Option<f64>,
    pub loader_tokens_per_s: Option<f64>,
    pub pipeline_wall_seconds: f64,
    /// By process.
    pub peak_resident_mib: std::collections::BTreeMap<String, f64>,
}

/// How much of what each rule keeps is noise, with the final SLM model as the current model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Selection {
    pub tokens: usize,
    pub documents: usize,
    pub ratio: f64,
    pub current_model: String,
    pub noise_share_of_corpus: f64,
    pub noise_share_of_corpus_bytes: f64,
    /// Share of easy tokens (learned at once) among all scored tokens.
    pub easy_share_of_corpus: f64,
    pub noise_share_selected_by_excess: f64,
    pub noise_share_selected_by_reference: f64,
    /// Share of noise among what each rule keeps, by rule.
    pub noise_share_selected: std::collections::BTreeMap<String, f64>,
    /// Share of easy tokens among what each rule keeps, by rule.
    pub easy_share_selected: std::collections::BTreeMap<String, f64>,
    /// By kind of noise, `easy` and `clean` (the hard clean text).
    pub by_kind: std::collections::BTreeMap<String, KindShare>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KindShare {
    pub tokens: usize,
    pub kept_by_excess: f64,
    pub kept_by_reference: f64,
    /// The share of these tokens each rule keeps, by rule.
    pub kept: std::collections::BTreeMap<String, f64>,
}

/// `N` of a checkpoint directory (see [`Compute`]).
fn matmul_parameters(model: &Path) -> anyhow::Result<usize> {
    let config = rho_model::checkpoint::read_config(model)?.into_config()?;
    Ok(config.matmul_parameters())
}

/// The curve's label of a rule.
fn rule_label(rule: ScoreRule, ratio: f64) -> String {
    let k = ratio * 100.0;
    match rule {
        ScoreRule::None => "causal LM (every token)".into(),
        ScoreRule::Excess => format!("SLM (top {k:.0}% by excess loss)"),
        ScoreRule::Reference => format!("top {k:.0}% by reference loss alone"),
        ScoreRule::Current => format!("top {k:.0}% by the model's own loss"),
        ScoreRule::Random => format!("a random {k:.0}% (control)"),
    }
}

/// Writes every part of the report and returns `report.json`'s contents.
pub fn write(inp: &Inputs) -> anyhow::Result<Report> {
    let plan = inp.plan;
    let [reference, causal, slm] = inp.runs;
    let mut targets = vec![(ScoreRule::None, causal), (ScoreRule::Excess, slm)];
    targets.extend(inp.ablations.iter().copied());
    let curves: Vec<Vec<(f64, f64)>> = targets.iter().map(|(_, run)| curve(run, plan)).collect();
    let final_of = |c: &[(f64, f64)]| c.last().map(|p| p.1);
    for ((rule, run), c) in targets.iter().zip(&curves) {
        anyhow::ensure!(
            !c.is_empty(),
            "the {} run `{}` has no evaluation",
            rule.name(),
            run.name
        );
    }
    let (c, s) = (curves[0].clone(), curves[1].clone());
    let causal_final = final_of(&c).context("the causal-LM run has no evaluation")?;
    let slm_final = final_of(&s).context("the SLM run has no evaluation")?;
    let budget = plan.tokens_per_run() as f64;
    let reach = tokens_to_reach(&s, causal_final);
    loss_chart(inp, &targets, &curves)?;
    let (selection, html) = match inp.sample_docs {
        Some(docs) => {
            let (a, h) = selection_analysis(inp, docs)?;
            (Some(a), Some(h))
        }
        None => (None, None),
    };
    if let Some(h) = &html {
        std::fs::write(inp.out.join("selection.html"), h)?;
    }
    let flops = Flops::of(inp)?;
    let rules: Vec<RuleRun> = targets
        .iter()
        .zip(&curves)
        .map(|(&(rule, run), curve)| {
            flops.rule_run(rule, run, curve, causal_final, selection.as_ref())
        })
        .collect();
    let compute = flops.compute(&rules[1], reference);
    let report = Report {
        seed: inp.seed,
        causal_final_eval_loss: causal_final,
        slm_final_eval_loss: slm_final,
        slm_minus_causal: slm_final - causal_final,
        reference_final_eval_loss: final_of(&curve(reference, plan)),
        slm_tokens_to_causal_final_fraction: reach.map(|r| r.0 / budget),
        slm_tokens_to_causal_final_fraction_interpolated: reach.map(|r| r.1 / budget),
        tokens_per_run: plan.tokens_per_run(),
        steps_per_run: plan.steps,
        reference_steps: plan.reference_steps,
        eval_every_steps: plan.eval_every,
        eval_tokens: plan.eval_batches * plan.batch * plan.seq_len,
        model: plan.preset.to_string(),
        batch: [plan.batch, plan.seq_len],
        ratio: plan.ratio,
        wall_seconds: inp.started.elapsed().as_secs_f64(),
        evals: Evals {
            causal: eval_points(&c),
            slm: eval_points(&s),
            ablations: by_ablation(&targets, |i| eval_points(&curves[i])),
        },
        rules,
        compute,
        selection,
        throughput: ByRun {
            reference: throughput(reference, plan),
            causal: throughput(causal, plan),
            slm: throughput(slm, plan),
            ablations: by_ablation(&targets, |i| throughput(targets[i].1, plan)),
        },
        runs: ByRun {
            reference: reference.dir.clone(),
            causal: causal.dir.clone(),
            slm: slm.dir.clone(),
            ablations: by_ablation(&targets, |i| targets[i].1.dir.clone()),
        },
    };
    std::fs::write(
        inp.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(inp.out.join("report.md"), markdown(&report))?;
    Ok(report)
}

/// The held-out loss of every target run against the tokens it read (`loss.svg`, `loss.png`).
fn loss_chart(
    inp: &Inputs,
    targets: &[(ScoreRule, &RunOutcome)],
    curves: &[Vec<(f64, f64)>],
) -> anyhow::Result<()> {
    Chart {
        title: "Held-out loss of the clean target distribution",
        x_label: "training tokens read (millions)",
        y_label: "loss (nats per token)",
        x_scale: 1e6,
        zoom: true,
        series: targets
            .iter()
            .zip(curves)
            .map(|((rule, _), points)| Series {
                label: rule_label(*rule, inp.plan.ratio),
                points: points.clone(),
            })
            .collect(),
    }
    .write(inp.out, "loss")?;
    Ok(())
}

/// `f(i)` of each ablation `i` of the target runs (causal LM and SLM come first), by its rule's
/// name.
fn by_ablation<T>(
    targets: &[(ScoreRule, &RunOutcome)],
    f: impl Fn(usize) -> T,
) -> std::collections::BTreeMap<String, T> {
    (2..targets.len())
        .map(|i| (targets[i].0.name().to_string(), f(i)))
        .collect()
}

/// A curve's points as the report writes them.
fn eval_points(c: &[(f64, f64)]) -> Vec<EvalAt> {
    c.iter()
        .map(|&(tokens, loss)| EvalAt { tokens, loss })
        .collect()
}

/// The compute model of the report: 6N per token of every batch trained, 2N_ref per token
/// scored.
struct Flops<'a> {
    plan: &'a Plan,
    /// The target's matmul parameters.
    n: f64,
    /// The reference's matmul parameters.
    n_ref: f64,
    /// What training the reference cost.
    reference_training: f64,
    /// Tokens read by every target run.
    budget: f64,
}

impl<'a> Flops<'a> {
    fn of(inp: &Inputs<'a>) -> anyhow::Result<Self> {
        let plan = inp.plan;
        let n_ref = matmul_parameters(inp.reference_model)? as f64;
        Ok(Flops {
            plan,
            n: matmul_parameters(inp.slm_model)? as f64,
            n_ref,
            reference_training: 6.0
                * n_ref
                * (plan.reference_steps * (plan.batch * plan.seq_len) as u64) as f64,
            budget: plan.tokens_per_run() as f64,
        })
    }

    /// A target run's training, and its scoring when the rule needs the reference.
    fn of_rule(&self, rule: ScoreRule) -> f64 {
        6.0 * self.n * self.budget
            + if rule.needs_reference() {
                2.0 * self.n_ref * self.budget
            } else {
                0.0
            }
    }

    /// The row of one target run: its final loss and what it took to reach the causal
    /// baseline's.
    fn rule_run(
        &self,
        rule: ScoreRule,
        run: &RunOutcome,
        curve: &[(f64, f64)],
        causal_final: f64,
        selection: Option<&Selection>,
    ) -> RuleRun {
        let (budget, causal_flops) = (self.budget, self.of_rule(ScoreRule::None));
        let final_loss = curve.last().map_or(f64::NAN, |p| p.1);
        let reach = tokens_to_reach(curve, causal_final);
        let flops = self.of_rule(rule);
        let to_final = reach.map(|r| flops * r.1 / budget);
        let extra = if rule.needs_reference() {
            self.reference_training
        } else {
            0.0
        };
        RuleRun {
            rule,
            run: run.name.clone(),
            final_eval_loss: final_loss,
            minus_causal: final_loss - causal_final,
            tokens_to_causal_final_fraction: reach.map(|r| r.0 / budget),
            tokens_to_causal_final_fraction_interpolated: reach.map(|r| r.1 / budget),
            noise_share_kept: selection.map(|sel| match rule {
                ScoreRule::None => sel.noise_share_of_corpus,
                r => sel
                    .noise_share_selected
                    .get(r.name())
                    .copied()
                    .unwrap_or(f64::NAN),
            }),
            flops,
            flops_to_causal_final: to_final,
            compute_to_causal_final_ratio: to_final.map(|f| f / causal_flops),
            compute_to_causal_final_ratio_with_reference_training: to_final
                .map(|f| (f + extra) / causal_flops),
            pipeline_wall_seconds: run.summary.wall_seconds,
        }
    }

    /// The compute section, from SLM's row and the reference's run.
    fn compute(&self, slm_row: &RuleRun, reference: &RunOutcome) -> Compute {
        let plan = self.plan;
        // Every position of a demo batch is valid: each step keeps round(k x positions).
        let kept_tokens = (plan.steps
            * rho_trainer::selection::keep_count(plan.ratio, plan.batch * plan.seq_len) as u64)
            as f64;
        Compute {
            target_parameters: self.n as usize,
            reference_parameters: self.n_ref as usize,
            reference_training_flops: self.reference_training,
            causal_flops: self.of_rule(ScoreRule::None),
            slm_flops: slm_row.flops,
            slm_selected_token_flops: 6.0 * self.n * kept_tokens,
            slm_to_causal_final_ratio: slm_row.compute_to_causal_final_ratio,
            slm_to_causal_final_ratio_with_reference_training: slm_row
                .compute_to_causal_final_ratio_with_reference_training,
            reference_wall_seconds: reference.summary.wall_seconds,
        }
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or("not reached".into(), |x| format!("{:.0}%", x * 100.0))
}

/// The table of the report, as Markdown.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| model | held-out loss at {} tokens | minus causal LM | tokens to reach causal LM's final loss | noise among trained tokens | compute to reach it (x causal LM; with the reference's training) | pipeline wall time |",
        r.tokens_per_run
    );
    s.push_str("|---|---|---|---|---|---|---|\n");
    for row in &r.rules {
        let rule = row.rule;
        let compute = match (
            row.compute_to_causal_final_ratio,
            row.compute_to_causal_final_ratio_with_reference_training,
        ) {
            (Some(a), Some(b)) if rule.needs_reference() => format!("{a:.2}x; {b:.2}x"),
            (Some(a), _) => format!("{a:.2}x"),
            _ => "not reached".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {:.4} | {:+.4} | {} | {} | {compute} | {:.0} s |",
            rule_label(rule, r.ratio),
            row.final_eval_loss,
            row.minus_causal,
            pct(row.tokens_to_causal_final_fraction),
            row.noise_share_kept
                .map_or("-".into(), |x| format!("{:.1}%", x * 100.0)),
            row.pipeline_wall_seconds
        );
    }
    let c = &r.compute;
    let _ = writeln!(
        s,
        "\nCompute (6N FLOPs per token of every trained batch, 2N per token the reference scores; N = {:.2}M target, {:.2}M reference weights in matrix products): causal LM {:.2e} FLOPs; SLM {:.2e} (its kept tokens alone, as the paper counts: {:.2e}); the reference's training {:.2e} ({:.0} s). {}",
        c.target_parameters as f64 / 1e6,
        c.reference_parameters as f64 / 1e6,
        c.causal_flops,
        c.slm_flops,
        c.slm_selected_token_flops,
        c.reference_training_flops,
        c.reference_wall_seconds,
        compute_sentence(c)
    );
    if let Some(sel) = &r.selection {
        let _ = writeln!(
            s,
            "\nNoise among tokens: {} of the corpus; {} of those kept by excess loss; {} of those kept by reference loss alone.",
            pct(Some(sel.noise_share_of_corpus)),
            pct(Some(sel.noise_share_selected_by_excess)),
            pct(Some(sel.noise_share_selected_by_reference))
        );
    }
    let t = &r.throughput.slm;
    let _ = writeln!(
        s,
        "\nSLM pipeline: trainer {:.0} tokens/s (waiting for data {:.0}% of its time), selector {:.0} tokens/s.",
        t.trainer_tokens_per_s,
        t.trainer_data_wait_fraction * 100.0,
        t.selector_tokens_per_s.unwrap_or(0.0)
    );
    s
}

/// What SLM's compute comes to against causal LM's, in one sentence.
pub fn compute_sentence(c: &Compute) -> String {
    match (
        c.slm_to_causal_final_ratio,
        c.slm_to_causal_final_ratio_with_reference_training,
    ) {
        (Some(a), Some(b)) => format!(
            "SLM reaches causal LM's final held-out loss with {a:.2}x causal LM's compute counting the reference's scoring, {b:.2}x counting the reference's training too."
        ),
        _ => "SLM does not reach causal LM's final held-out loss within the budget.".into(),
    }
}

/// What the terminal shows at the end.
pub fn summary_text(r: &Report, out: &Path) -> String {
    let page = match r.selection {
        Some(_) => ", selection.html",
        None => "",
    };
    format!(
        "\n{}\nwall time {:.0} s. Report: {} (report.md, loss.svg, loss.png{page}; runs/ holds each pipeline's configs, logs and metrics)",
        markdown(r),
        r.wall_seconds,
        out.join("report.json").display()
    )
}
