//! The report of `rho demo`: numbers (`report.json`, `report.md`), loss curves (`loss.svg`,
//! `loss.png`) and the token-selection page (`selection.html`).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::corpus::{Doc, NoiseKind};
use crate::demo::Plan;
use crate::supervise::RunOutcome;
use rho_trainer::{Scope, ScoreRule};

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
    run.summary["trainer"]["evals"]
        .as_array()
        .map(|evals| {
            evals
                .iter()
                .filter_map(|e| Some((e["step"].as_f64()? * per_step, e["loss"].as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// The first evaluation at or below `target`, and the same point linearly interpolated between
/// the evaluations around it.
fn tokens_to_reach(curve: &[(f64, f64)], target: f64) -> Option<(f64, f64)> {
    let i = curve.iter().position(|&(_, y)| y <= target)?;
    if i == 0 {
        return Some((curve[0].0, curve[0].0));
    }
    let ((x0, y0), (x1, y1)) = (curve[i - 1], curve[i]);
    let t = if y0 > y1 {
        (y0 - target) / (y0 - y1)
    } else {
        1.0
    };
    Some((x1, x0 + t * (x1 - x0)))
}

/// Throughput of the processes of one run, from their reports.
fn throughput(run: &RunOutcome, plan: &Plan) -> Value {
    let t = &run.summary["trainer"];
    let steps = t["steps"].as_f64().unwrap_or(0.0);
    let wall = t["wall_secs"].as_f64().unwrap_or(0.0);
    let read = steps * (plan.batch * plan.seq_len) as f64;
    let selector: Option<Value> = std::fs::read_to_string(run.dir.join("selector-0.report.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    json!({
        "trainer_tokens_per_s": if wall > 0.0 { read / wall } else { 0.0 },
        "trainer_data_wait_fraction": t["data_wait_fraction"],
        "trainer_wall_seconds": wall,
        "selector_tokens_per_s": selector.as_ref().map(|s| {
            s["tokens"].as_f64().unwrap_or(0.0) / s["score_secs"].as_f64().unwrap_or(1.0).max(1e-9)
        }),
        "loader_tokens_per_s": run.summary["loader"]["tokens_per_s"],
        "pipeline_wall_seconds": run.summary["wall_seconds"],
        "peak_resident_mib": run.memory.iter().map(|(process, samples)| {
            let peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
            (process.clone(), json!(peak as f64 / 1024.0))
        }).collect::<serde_json::Map<_, _>>(),
    })
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
fn selection_analysis(inp: &Inputs, docs: &[Doc]) -> anyhow::Result<(Value, String)> {
    let plan = inp.plan;
    let tk = crate::load_tokenizer(inp.tokenizer)?;
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
        let l_ref = rho_model::per_token_loss(&reference, &t, rho_model::Path::Fused, None)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let l_cur = rho_model::per_token_loss(&current, &t, rho_model::Path::Fused, None)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let valid = vec![true; rows * len];
        let keep = |rule| {
            rho_trainer::selection::select(
                rule,
                Scope::Batch,
                plan.ratio,
                rows,
                len,
                &l_cur,
                Some(&l_ref),
                &valid,
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
    let mut kind_table = serde_json::Map::new();
    for (slot, &(tokens, e, r)) in per_kind.iter().enumerate() {
        let name = kinds.get(slot).map_or("clean", |k| k.name());
        kind_table.insert(
            name.into(),
            json!({"tokens": tokens, "kept_by_excess": share(e, tokens), "kept_by_reference": share(r, tokens)}),
        );
    }
    let analysis = json!({
        "tokens": n,
        "documents": used_docs,
        "ratio": plan.ratio,
        "current_model": "the SLM model at the end of training",
        "noise_share_of_corpus": share(noise, n),
        "noise_share_of_corpus_bytes": share(
            docs[..used_docs].iter().map(Doc::noise_bytes).sum(),
            docs[..used_docs].iter().map(|d| d.text.len()).sum(),
        ),
        "noise_share_selected_by_excess": share(ex_noise, ex),
        "noise_share_selected_by_reference": share(rf_noise, rf),
        "by_kind": kind_table,
    });

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

/// The held-out loss curves of both target runs, as SVG and PNG.
fn plot(out: &Path, causal: &[(f64, f64)], slm: &[(f64, f64)], ratio: f64) -> anyhow::Result<()> {
    use plotters::prelude::*;
    static FONT: std::sync::Once = std::sync::Once::new();
    FONT.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            include_bytes!("../assets/DejaVuSansMono.ttf"),
        );
    });
    fn draw<DB: DrawingBackend>(
        root: DrawingArea<DB, plotters::coord::Shift>,
        causal: &[(f64, f64)],
        slm: &[(f64, f64)],
        ratio: f64,
    ) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("drawing the plot: {e:?}");
        root.fill(&WHITE).map_err(e)?;
        let all = causal.iter().chain(slm);
        let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max) / 1e6;
        // Skip the untrained start so that the end of training is readable.
        let tail = |c: &[(f64, f64)]| c.iter().skip(1).map(|p| p.1).collect::<Vec<_>>();
        let ys: Vec<f64> = tail(causal).into_iter().chain(tail(slm)).collect();
        let (y_min, y_max) = ys
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &y| (a.min(y), b.max(y)));
        let (y_min, y_max) = if y_min < y_max {
            (y_min, y_max)
        } else {
            (0.0, 10.0)
        };
        let pad = (y_max - y_min) * 0.05;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Held-out loss of the clean target distribution",
                ("sans-serif", 22),
            )
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, (y_min - pad)..(y_max + pad))
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("training tokens read (millions)")
            .y_desc("loss (nats per token)")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(e)?;
        let red = RGBColor(200, 60, 40);
        let green = RGBColor(34, 139, 34);
        let to_m = |c: &[(f64, f64)]| c.iter().map(|&(x, y)| (x / 1e6, y)).collect::<Vec<_>>();
        chart
            .draw_series(LineSeries::new(to_m(causal), red.stroke_width(2)))
            .map_err(e)?
            .label("causal LM (every token)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], red.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(to_m(slm), green.stroke_width(2)))
            .map_err(e)?
            .label(format!("SLM (top {:.0}% by excess loss)", ratio * 100.0))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], green.stroke_width(2))
            });
        chart
            .draw_series(
                to_m(causal)
                    .into_iter()
                    .map(|p| Circle::new(p, 2, red.filled())),
            )
            .map_err(e)?;
        chart
            .draw_series(
                to_m(slm)
                    .into_iter()
                    .map(|p| Circle::new(p, 2, green.filled())),
            )
            .map_err(e)?;
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(e)?;
        root.present().map_err(e)?;
        Ok(())
    }
    let svg = out.join("loss.svg");
    draw(
        SVGBackend::new(&svg, (800, 500)).into_drawing_area(),
        causal,
        slm,
        ratio,
    )
    .with_context(|| svg.display().to_string())?;
    let png = out.join("loss.png");
    draw(
        BitMapBackend::new(&png, (800, 500)).into_drawing_area(),
        causal,
        slm,
        ratio,
    )
    .with_context(|| png.display().to_string())?;
    Ok(())
}

/// Writes every part of the report and returns `report.json`'s contents.
pub fn write(inp: &Inputs) -> anyhow::Result<Value> {
    let plan = inp.plan;
    let [reference, causal, slm] = inp.runs;
    let (c, s) = (curve(causal, plan), curve(slm, plan));
    let final_of = |c: &[(f64, f64)]| c.last().map(|p| p.1);
    let causal_final = final_of(&c).context("the causal-LM run has no evaluation")?;
    let slm_final = final_of(&s).context("the SLM run has no evaluation")?;
    let budget = plan.tokens_per_run() as f64;
    let reach = tokens_to_reach(&s, causal_final);
    plot(inp.out, &c, &s, plan.ratio)?;
    let (selection, html) = match inp.sample_docs {
        Some(docs) => {
            let (a, h) = selection_analysis(inp, docs)?;
            (a, Some(h))
        }
        None => (Value::Null, None),
    };
    if let Some(h) = &html {
        std::fs::write(inp.out.join("selection.html"), h)?;
    }
    let report = json!({
        "seed": inp.seed,
        "causal_final_eval_loss": causal_final,
        "slm_final_eval_loss": slm_final,
        "slm_minus_causal": slm_final - causal_final,
        "reference_final_eval_loss": final_of(&curve(reference, plan)),
        "slm_tokens_to_causal_final_fraction": reach.map(|r| r.0 / budget),
        "slm_tokens_to_causal_final_fraction_interpolated": reach.map(|r| r.1 / budget),
        "tokens_per_run": plan.tokens_per_run(),
        "steps_per_run": plan.steps,
        "reference_steps": plan.reference_steps,
        "eval_every_steps": plan.eval_every,
        "eval_tokens": plan.eval_batches * plan.batch * plan.seq_len,
        "model": plan.preset,
        "batch": [plan.batch, plan.seq_len],
        "ratio": plan.ratio,
        "wall_seconds": inp.started.elapsed().as_secs_f64(),
        "evals": {
            "causal": c.iter().map(|p| json!({"tokens": p.0, "loss": p.1})).collect::<Vec<_>>(),
            "slm": s.iter().map(|p| json!({"tokens": p.0, "loss": p.1})).collect::<Vec<_>>(),
        },
        "selection": selection,
        "throughput": {
            "reference": throughput(reference, plan),
            "causal": throughput(causal, plan),
            "slm": throughput(slm, plan),
        },
        "runs": {
            "reference": reference.dir, "causal": causal.dir, "slm": slm.dir,
        },
    });
    std::fs::write(
        inp.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(inp.out.join("report.md"), markdown(&report))?;
    Ok(report)
}

fn pct(v: &Value) -> String {
    v.as_f64()
        .map_or("not reached".into(), |x| format!("{:.0}%", x * 100.0))
}

fn num(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.4}"))
}

/// The table of the report, as Markdown.
pub fn markdown(r: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| model | held-out loss at {} tokens | tokens to reach causal LM's final loss |",
        r["tokens_per_run"]
    );
    s.push_str("|---|---|---|\n");
    let _ = writeln!(
        s,
        "| causal LM (every token) | {} | 100% |",
        num(&r["causal_final_eval_loss"])
    );
    let _ = writeln!(
        s,
        "| SLM, top {:.0}% by excess loss | {} | {} |",
        r["ratio"].as_f64().unwrap_or(0.0) * 100.0,
        num(&r["slm_final_eval_loss"]),
        pct(&r["slm_tokens_to_causal_final_fraction"])
    );
    let sel = &r["selection"];
    if !sel.is_null() {
        let _ = writeln!(
            s,
            "\nNoise among tokens: {} of the corpus; {} of those kept by excess loss; {} of those kept by reference loss alone.",
            pct(&sel["noise_share_of_corpus"]),
            pct(&sel["noise_share_selected_by_excess"]),
            pct(&sel["noise_share_selected_by_reference"])
        );
    }
    let t = &r["throughput"]["slm"];
    let _ = writeln!(
        s,
        "\nSLM pipeline: trainer {:.0} tokens/s (waiting for data {:.0}% of its time), selector {:.0} tokens/s.",
        t["trainer_tokens_per_s"].as_f64().unwrap_or(0.0),
        t["trainer_data_wait_fraction"].as_f64().unwrap_or(0.0) * 100.0,
        t["selector_tokens_per_s"].as_f64().unwrap_or(0.0)
    );
    s
}

/// What the terminal shows at the end.
pub fn summary_text(r: &Value, out: &Path) -> String {
    let page = if r["selection"].is_null() {
        ""
    } else {
        ", selection.html"
    };
    format!(
        "\n{}\nwall time {:.0} s. Report: {} (report.md, loss.svg, loss.png{page}; runs/ holds each pipeline's configs, logs and metrics)",
        markdown(r),
        r["wall_seconds"].as_f64().unwrap_or(0.0),
        out.join("report.json").display()
    )
}

#[cfg(test)]
mod tests {
    use super::tokens_to_reach;

    #[test]
    fn reach_is_the_first_evaluation_at_or_below_the_target() {
        let c = [(0.0, 5.0), (10.0, 4.0), (20.0, 3.0), (30.0, 2.5)];
        assert_eq!(tokens_to_reach(&c, 3.0), Some((20.0, 20.0)));
        let (first, interpolated) = tokens_to_reach(&c, 3.5).unwrap();
        assert_eq!(first, 20.0);
        assert!((interpolated - 15.0).abs() < 1e-9);
        assert_eq!(tokens_to_reach(&c, 2.0), None);
        assert_eq!(tokens_to_reach(&c, 9.0), Some((0.0, 0.0)));
    }
}
