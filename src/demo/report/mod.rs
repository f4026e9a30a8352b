//! The report of `rho demo`: numbers (`report.json`, `report.md`), loss curves (`loss.svg`,
//! `loss.png`) and the token-selection page (`selection.html`).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::plan::Plan;
use crate::report::chart::{Chart, Series};
use crate::report::selection::{page, score_docs, Packing, ScoredDocs};
use crate::report::tokens_to_reach;
use crate::supervise::RunOutcome;
use crate::synth::{Doc, NoiseKind};

pub struct Inputs<'a> {
    pub out: &'a Path,
    pub plan: &'a Plan,
    pub seed: u64,
    pub tokenizer: &'a Path,
    pub reference_model: &'a Path,
    pub slm_model: &'a Path,
    /// Reference, causal, SLM.
    pub runs: [&'a RunOutcome; 3],
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

/// Selection by excess loss and by reference loss alone over packed windows of `docs`, with the
/// final SLM model as the current model: how much of what each keeps is noise.
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
    let intro = format!(
        "<p>Noise among all tokens: <b>{:.1}%</b>. Among the {:.0}% kept by excess loss (SLM): <b>{:.1}%</b>. \
         Among the {:.0}% kept by reference loss alone: <b>{:.1}%</b>. Current model: the SLM model at the end of training; \
         selection over batches of {} x {} tokens, as in training.</p>",
        analysis.noise_share_of_corpus * 100.0,
        plan.ratio * 100.0,
        analysis.noise_share_selected_by_excess * 100.0,
        plan.ratio * 100.0,
        analysis.noise_share_selected_by_reference * 100.0,
        plan.batch,
        plan.seq_len
    );
    Ok((analysis, page(docs, &sd, &intro, 8, true)))
}

/// Shares of noise among the scored tokens, overall and per kind, and among what each rule keeps.
fn noise_shares(docs: &[Doc], sd: &ScoredDocs, ratio: f64) -> Selection {
    let kinds = [
        NoiseKind::Id,
        NoiseKind::Url,
        NoiseKind::Boilerplate,
        NoiseKind::Shuffled,
        NoiseKind::WrongResult,
    ];
    let (mut n, mut noise, mut ex, mut ex_noise, mut rf, mut rf_noise) = (0, 0, 0, 0, 0, 0);
    let mut per_kind = vec![(0usize, 0usize, 0usize); kinds.len() + 1]; // clean last
    for (i, s) in sd.scored.iter().enumerate() {
        let Some(s) = s else { continue };
        let (d, start, end) = sd.origin[i];
        let k = docs[d].noise_kind(start, end);
        let slot = k.map_or(kinds.len(), |k| {
            kinds.iter().position(|&x| x == k).unwrap_or(0)
        });
        n += 1;
        ex += usize::from(s.by_excess);
        rf += usize::from(s.by_reference);
        per_kind[slot].0 += 1;
        per_kind[slot].1 += usize::from(s.by_excess);
        per_kind[slot].2 += usize::from(s.by_reference);
        if k.is_some() {
            noise += 1;
            ex_noise += usize::from(s.by_excess);
            rf_noise += usize::from(s.by_reference);
        }
    }
    let share = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let mut by_kind = std::collections::BTreeMap::new();
    for (slot, &(tokens, e, r)) in per_kind.iter().enumerate() {
        let name = kinds.get(slot).map_or("clean", |k| k.name());
        let kept = KindShare {
            tokens,
            kept_by_excess: share(e, tokens),
            kept_by_reference: share(r, tokens),
        };
        by_kind.insert(name.to_string(), kept);
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
        noise_share_selected_by_excess: share(ex_noise, ex),
        noise_share_selected_by_reference: share(rf_noise, rf),
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
    /// What each rule selects of the noise (synthetic data only).
    pub selection: Option<Selection>,
    pub throughput: ByRun<Throughput>,
    pub runs: ByRun<std::path::PathBuf>,
}

/// Held-out loss by tokens read, of both target runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evals {
    pub causal: Vec<EvalAt>,
    pub slm: Vec<EvalAt>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct EvalAt {
    pub tokens: f64,
    pub loss: f64,
}

/// One value for each of the three runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ByRun<T> {
    pub reference: T,
    pub causal: T,
    pub slm: T,
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
    pub noise_share_selected_by_excess: f64,
    pub noise_share_selected_by_reference: f64,
    /// By kind of noise, and `clean`.
    pub by_kind: std::collections::BTreeMap<String, KindShare>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KindShare {
    pub tokens: usize,
    pub kept_by_excess: f64,
    pub kept_by_reference: f64,
}

/// Writes every part of the report and returns `report.json`'s contents.
pub fn write(inp: &Inputs) -> anyhow::Result<Report> {
    let plan = inp.plan;
    let [reference, causal, slm] = inp.runs;
    let (c, s) = (curve(causal, plan), curve(slm, plan));
    let final_of = |c: &[(f64, f64)]| c.last().map(|p| p.1);
    let causal_final = final_of(&c).context("the causal-LM run has no evaluation")?;
    let slm_final = final_of(&s).context("the SLM run has no evaluation")?;
    let budget = plan.tokens_per_run() as f64;
    let reach = tokens_to_reach(&s, causal_final);
    Chart {
        title: "Held-out loss of the clean target distribution",
        x_label: "training tokens read (millions)",
        y_label: "loss (nats per token)",
        x_scale: 1e6,
        zoom: true,
        series: vec![
            Series {
                label: "causal LM (every token)".into(),
                points: c.clone(),
            },
            Series {
                label: format!("SLM (top {:.0}% by excess loss)", plan.ratio * 100.0),
                points: s.clone(),
            },
        ],
    }
    .write(inp.out, "loss")?;
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
    let points = |c: &[(f64, f64)]| {
        c.iter()
            .map(|&(tokens, loss)| EvalAt { tokens, loss })
            .collect()
    };
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
            causal: points(&c),
            slm: points(&s),
        },
        selection,
        throughput: ByRun {
            reference: throughput(reference, plan),
            causal: throughput(causal, plan),
            slm: throughput(slm, plan),
        },
        runs: ByRun {
            reference: reference.dir.clone(),
            causal: causal.dir.clone(),
            slm: slm.dir.clone(),
        },
    };
    std::fs::write(
        inp.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(inp.out.join("report.md"), markdown(&report))?;
    Ok(report)
}

fn pct(v: Option<f64>) -> String {
    v.map_or("not reached".into(), |x| format!("{:.0}%", x * 100.0))
}

/// The table of the report, as Markdown.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| model | held-out loss at {} tokens | tokens to reach causal LM's final loss |",
        r.tokens_per_run
    );
    s.push_str("|---|---|---|\n");
    let _ = writeln!(
        s,
        "| causal LM (every token) | {:.4} | 100% |",
        r.causal_final_eval_loss
    );
    let _ = writeln!(
        s,
        "| SLM, top {:.0}% by excess loss | {:.4} | {} |",
        r.ratio * 100.0,
        r.slm_final_eval_loss,
        pct(r.slm_tokens_to_causal_final_fraction)
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
