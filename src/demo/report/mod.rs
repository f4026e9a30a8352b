//! The report of `rho demo`: numbers (`report.json`, `report.md`), loss curves (`loss.svg`,
//! `loss.png`) and the token-selection page (`selection.html`).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::plan::Plan;
use crate::supervise::RunOutcome;
use crate::synth::{Doc, NoiseKind};
use rho_trainer::selection::Losses;
use rho_trainer::{Scope, ScoreRule};

use crate::report::chart::{Chart, Series};
use crate::report::tokens_to_reach;

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

/// One scored target token of the selection analysis.
#[derive(Clone, Copy)]
struct Scored {
    reference: f32,
    current: f32,
    by_excess: bool,
    by_reference: bool,
}

/// Selection by excess loss and by reference loss alone over packed windows of `docs`, with the
/// final SLM model as the current model: how much of what each keeps is noise.
fn selection_analysis(inp: &Inputs, docs: &[Doc]) -> anyhow::Result<(Selection, String)> {
    let plan = inp.plan;
    let tk = crate::runtime::load_tokenizer(inp.tokenizer)?;
    let device = Device::Cpu;
    let reference = rho_model::checkpoint::load(inp.reference_model, &device, DType::F32)?;
    let current = rho_model::checkpoint::load(inp.slm_model, &device, DType::F32)?;

    // Tokens of the documents, one stream, as the loader packs them.
    let batches = if plan.quick() { 2 } else { 12 };
    let need = batches * plan.batch * plan.seq_len + 1;
    let mut ids = Vec::new();
    let mut origin = Vec::new(); // (doc, byte start, byte end)
    let mut used_docs = 0;
    for (d, doc) in docs.iter().enumerate() {
        if ids.len() >= need {
            break;
        }
        let enc = tk
            .encode(doc.text.as_str(), false)
            .map_err(|e| anyhow::anyhow!("tokenizing a sample document: {e}"))?;
        for (&id, &(s, e)) in enc.get_ids().iter().zip(enc.get_offsets()) {
            ids.push(id);
            origin.push((d, s, e));
        }
        used_docs = d + 1;
    }
    let rows_total = (ids.len().saturating_sub(1)) / plan.seq_len;
    let batches = (rows_total / plan.batch).min(batches);
    anyhow::ensure!(batches > 0, "too few sample documents for one batch");

    let mut scored: Vec<Option<Scored>> = vec![None; ids.len()];
    let (rows, len) = (plan.batch, plan.seq_len);
    for b in 0..batches {
        let mut window = Vec::with_capacity(rows * (len + 1));
        for r in 0..rows {
            let start = (b * rows + r) * len;
            window.extend_from_slice(&ids[start..start + len + 1]);
        }
        let t = Tensor::from_vec(window, (rows, len + 1), &device)?;
        let l_ref = rho_model::per_token_loss(&reference, &t, rho_model::ForwardMode::Fused, None)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let l_cur = rho_model::per_token_loss(&current, &t, rho_model::ForwardMode::Fused, None)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let valid = vec![true; rows * len];
        let keep = |rule| {
            rho_trainer::selection::select(
                rule,
                Scope::Batch,
                plan.ratio,
                &Losses {
                    rows,
                    len,
                    current: &l_cur,
                    reference: Some(&l_ref),
                    valid: &valid,
                },
            )
        };
        let (by_excess, by_reference) = (keep(ScoreRule::Excess), keep(ScoreRule::Reference));
        for i in 0..rows * len {
            let target = (b * rows + i / len) * len + i % len + 1;
            scored[target] = Some(Scored {
                reference: l_ref[i],
                current: l_cur[i],
                by_excess: by_excess[i] != 0.0,
                by_reference: by_reference[i] != 0.0,
            });
        }
    }

    // Shares of noise, overall and per kind.
    let kinds = [
        NoiseKind::Id,
        NoiseKind::Url,
        NoiseKind::Boilerplate,
        NoiseKind::Shuffled,
        NoiseKind::WrongResult,
    ];
    let kind_of = |i: usize| -> Option<NoiseKind> {
        let (d, s, e) = origin[i];
        docs[d].noise_kind(s, e)
    };
    let (mut n, mut noise, mut ex, mut ex_noise, mut rf, mut rf_noise) = (0, 0, 0, 0, 0, 0);
    let mut per_kind = vec![(0usize, 0usize, 0usize); kinds.len() + 1]; // clean last
    for (i, s) in scored.iter().enumerate() {
        let Some(s) = s else { continue };
        let k = kind_of(i);
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
    let analysis = Selection {
        tokens: n,
        documents: used_docs,
        ratio: plan.ratio,
        current_model: "the SLM model at the end of training".into(),
        noise_share_of_corpus: share(noise, n),
        noise_share_of_corpus_bytes: share(
            docs[..used_docs].iter().map(Doc::noise_bytes).sum(),
            docs[..used_docs].iter().map(|d| d.text.len()).sum(),
        ),
        noise_share_selected_by_excess: share(ex_noise, ex),
        noise_share_selected_by_reference: share(rf_noise, rf),
        by_kind,
    };

    // The page: documents with noise, each token colored.
    let mut html = String::new();
    html.push_str(PAGE_HEAD);
    let _ = write!(
        html,
        "<p>Noise among all tokens: <b>{:.1}%</b>. Among the {:.0}% kept by excess loss (SLM): <b>{:.1}%</b>. \
         Among the {:.0}% kept by reference loss alone: <b>{:.1}%</b>. Current model: the SLM model at the end of training; \
         selection over batches of {} x {} tokens, as in training.</p>",
        share(noise, n) * 100.0,
        plan.ratio * 100.0,
        share(ex_noise, ex) * 100.0,
        plan.ratio * 100.0,
        share(rf_noise, rf) * 100.0,
        plan.batch,
        plan.seq_len
    );
    let max_excess = scored
        .iter()
        .flatten()
        .map(|s| s.current - s.reference)
        .fold(0f32, f32::max)
        .max(1e-6);
    let mut shown = 0;
    let mut i = 0;
    for (d, doc) in docs.iter().enumerate().take(used_docs) {
        let start = i;
        while i < origin.len() && origin[i].0 == d {
            i += 1;
        }
        if doc.noise.is_empty() || shown >= 8 || scored[start].is_none() {
            continue;
        }
        shown += 1;
        let _ = write!(html, "<h3>Document {d}</h3><div class=\"doc\">");
        let mut cursor = 0;
        for j in start..i {
            let (_, s, e) = origin[j];
            let (s, e) = (s.max(cursor), e.max(cursor));
            // Offsets leave out the spaces a byte-level token carries: write them as they are.
            html.push_str(&escape(&doc.text[cursor..s]));
            let text = &doc.text[s..e];
            cursor = e;
            let noisy = kind_of(j);
            let mut classes = vec![];
            if noisy.is_some() {
                classes.push("noise");
            }
            let (style, title) = match scored[j] {
                Some(sc) => {
                    let excess = sc.current - sc.reference;
                    let alpha = 0.15 + 0.75 * (excess / max_excess).clamp(0.0, 1.0);
                    if sc.by_excess {
                        classes.push("kept");
                    }
                    (
                        if sc.by_excess {
                            format!("background: rgba(34,139,34,{alpha:.2})")
                        } else {
                            String::new()
                        },
                        format!(
                            "reference {:.2} | model {:.2} | excess {:+.2} | {}{}",
                            sc.reference,
                            sc.current,
                            excess,
                            if sc.by_excess { "kept" } else { "left out" },
                            noisy.map_or(String::new(), |k| format!(" | noise: {}", k.name()))
                        ),
                    )
                }
                None => (String::new(), "not scored".into()),
            };
            let _ = write!(
                html,
                "<span class=\"{}\" style=\"{style}\" title=\"{}\">{}</span>",
                classes.join(" "),
                escape(&title),
                escape(text)
            );
        }
        html.push_str(&escape(&doc.text[cursor..]));
        html.push_str("</div>");
    }
    html.push_str("</body></html>\n");
    Ok((analysis, html))
}

const PAGE_HEAD: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>rho demo: which tokens SLM trains on</title>
<style>
body { font-family: sans-serif; max-width: 60em; margin: 2em auto; line-height: 1.5; }
.doc { font-family: monospace; white-space: pre-wrap; border: 1px solid #ccc; padding: 1em; }
.doc span:not(.kept) { color: #777; }
.noise { text-decoration: underline wavy #c00; }
.legend span { padding: 0 .3em; }
</style></head><body>
<h1>Which tokens SLM trains on</h1>
<p class="legend">Green: kept by SLM (darker: larger excess loss, model loss minus reference loss).
Grey: left out. <span class="noise">Wavy red underline</span>: noise the corpus generator inserted
(ids, hashes, tracking URLs, boilerplate, shuffled text, wrong results). Hover a token for its losses.</p>
"#;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
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
