//! `rho report RUN_DIR [RUN_DIR ...]`: one page comparing runs, from what their directories
//! hold: held-out loss against training tokens, training loss, throughput and time waiting for
//! data, selected fraction and mean excess loss, and a table (final losses, tokens to reach the
//! first run's final loss, throughput, restarts, redeliveries). The charts are SVG and PNG files
//! beside `report.html` and `report.md`. `rho demo` draws its loss curves with the same
//! [`chart`] and measures reach with [`tokens_to_reach`].

pub mod chart;
pub mod runs;
pub mod selection;

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use chart::{Chart, Series};
use rho_trainer::StepMetrics;
use runs::RunData;
use selection::escape;

/// What `rho report` reads and where it writes.
#[derive(Args)]
pub struct ReportArgs {
    /// Run directories (of `rho run`, or any with a trainer's `trainer.metrics.jsonl`); the
    /// first is the baseline the others are compared with.
    #[arg(required_unless_present = "selection", num_args = 1..)]
    pub runs: Vec<PathBuf>,
    /// Where the page and its charts go. Default: `report/` in the first run directory (with
    /// `--selection`: `report/` here).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Instead of comparing runs: the token-selection page (`selection.html`) of a current
    /// model against a reference on a shard's documents.
    #[arg(long)]
    pub selection: bool,
    #[command(flatten)]
    pub selection_args: selection::SelectionArgs,
}

/// The first evaluation at or below `target`, and the same point linearly interpolated between
/// the evaluations around it: `(x at the first evaluation, interpolated x)`.
pub fn tokens_to_reach(curve: &[(f64, f64)], target: f64) -> Option<(f64, f64)> {
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

/// One row of the report's table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// The run directory's name.
    pub run: String,
    /// Steps taken.
    pub steps: u64,
    /// Tokens trained on.
    pub tokens: u64,
    /// The last held-out loss.
    pub final_eval_loss: Option<f64>,
    /// Tokens this run trained on before its held-out loss first reached the first run's final
    /// held-out loss, over the first run's tokens.
    pub tokens_to_baseline_final: Option<f64>,
    /// Trainer tokens/s (wall time, steady state).
    pub trainer_tokens_per_s: Option<f64>,
    /// The trainer's share of wall time spent waiting for batches.
    pub data_wait_fraction: Option<f64>,
    /// Selector restarts (under `rho run`).
    pub selector_restarts: Option<u64>,
    /// Batches the loader handed out again.
    pub redeliveries: Option<u64>,
}

fn rows(runs: &[RunData]) -> Vec<Row> {
    let baseline = runs.first().and_then(|r| r.eval_curve().last().copied());
    let base_tokens = runs.first().map_or(0, RunData::tokens) as f64;
    runs.iter()
        .map(|r| {
            let curve = r.eval_curve();
            let reach = baseline.and_then(|(_, loss)| tokens_to_reach(&curve, loss));
            Row {
                run: r.name.clone(),
                steps: r.step_count(),
                tokens: r.tokens(),
                final_eval_loss: curve.last().map(|p| p.1),
                tokens_to_baseline_final: reach
                    .filter(|_| base_tokens > 0.0)
                    .map(|(x, _)| x / base_tokens),
                trainer_tokens_per_s: r.steady_tokens_per_s(),
                data_wait_fraction: r.trainer.as_ref().map(|t| t.data_wait_fraction),
                selector_restarts: r.summary.as_ref().map(|s| s.selector_restarts),
                redeliveries: r.loader.last().map(|l| l.counts.redeliveries),
            }
        })
        .collect()
}

/// The charts of the report: `(file stem, chart)`.
fn charts(runs: &[RunData]) -> Vec<(&'static str, Chart<'static>)> {
    let per_run = |value: &dyn Fn(&RunData) -> Vec<(f64, f64)>| per_run(runs, value);
    let by_step = |title, y_label, zoom, value: &dyn Fn(&StepMetrics) -> f64| Chart {
        title,
        x_label: "step",
        y_label,
        x_scale: 1.0,
        zoom,
        series: per_run(&|r| r.per_step(value)),
    };
    let over_time = |title, x_label, y_label, series| Chart {
        title,
        x_label,
        y_label,
        x_scale: 1.0,
        zoom: false,
        series,
    };
    let loader = per_run(&|r| {
        r.loader
            .iter()
            .map(|l| (l.elapsed_s, l.tokens_per_s))
            .collect()
    });
    vec![
        (
            "eval_loss",
            Chart {
                title: "Held-out loss",
                x_label: "training tokens (millions)",
                y_label: "loss (nats per token)",
                x_scale: 1e6,
                zoom: true,
                series: per_run(&RunData::eval_curve),
            },
        ),
        (
            "train_loss",
            by_step(
                "Training loss on every token",
                "loss (nats per token)",
                true,
                &|s| f64::from(s.stats.loss_all),
            ),
        ),
        (
            "throughput",
            over_time(
                "Throughput: trainer steps and selectors",
                "seconds since the process started",
                "tokens per second",
                throughput_series(runs),
            ),
        ),
        (
            "loader_throughput",
            over_time(
                "Loader: tokens tokenized (it works ahead of its consumers)",
                "seconds since the loader started",
                "tokens/s (mean since start)",
                loader,
            ),
        ),
        (
            "data_wait",
            by_step(
                "Trainer time waiting for data",
                "share of wall time",
                false,
                &|s| s.data_wait_fraction,
            ),
        ),
        (
            "selected_fraction",
            by_step(
                "Tokens trained on",
                "selected / valid tokens",
                false,
                &|s| f64::from(s.stats.selected_fraction),
            ),
        ),
        (
            "mean_excess",
            by_step(
                "Mean excess loss (current - reference)",
                "nats per token",
                false,
                &|s| f64::from(s.stats.mean_excess),
            ),
        ),
    ]
}

/// One series per run of `value`, runs with no points left out.
fn per_run(runs: &[RunData], value: &dyn Fn(&RunData) -> Vec<(f64, f64)>) -> Vec<Series> {
    runs.iter()
        .map(|r| Series {
            label: r.name.clone(),
            points: value(r),
        })
        .filter(|s| !s.points.is_empty())
        .collect()
}

/// Each run's trainer tokens/s by step time, then each of its selectors' mean since start.
fn throughput_series(runs: &[RunData]) -> Vec<Series> {
    let mut throughput = per_run(runs, &|r| {
        let steps = r.steps.iter();
        steps.map(|s| (s.elapsed_s, s.tokens_per_s)).collect()
    });
    for r in runs {
        for (process, lines) in &r.selectors {
            throughput.push(Series {
                label: format!("{} {process} (mean since start)", r.name),
                points: lines
                    .iter()
                    .map(|l| (l.elapsed_s, l.tokens_per_s))
                    .collect(),
            });
        }
    }
    throughput
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or("-".into(), f)
}

/// The table's column headings.
const COLUMNS: [&str; 9] = [
    "run",
    "steps",
    "tokens",
    "final held-out loss",
    "tokens to reach the first run's final loss",
    "trainer tokens/s",
    "waiting for data",
    "selector restarts",
    "redeliveries",
];

/// A row's cells, as text, in the order of [`COLUMNS`].
fn cells(r: &Row) -> [String; 9] {
    let count = |n: Option<u64>| n.map_or("-".into(), |n| n.to_string());
    [
        r.run.clone(),
        r.steps.to_string(),
        r.tokens.to_string(),
        opt(r.final_eval_loss, |x| format!("{x:.4}")),
        opt(r.tokens_to_baseline_final, |x| format!("{:.0}%", x * 100.0)),
        opt(r.trainer_tokens_per_s, |x| format!("{x:.0}")),
        opt(r.data_wait_fraction, |x| format!("{:.0}%", x * 100.0)),
        count(r.selector_restarts),
        count(r.redeliveries),
    ]
}

/// The table, as Markdown.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = format!(
        "| {} |\n|{}\n",
        COLUMNS.join(" | "),
        "---|".repeat(COLUMNS.len())
    );
    for r in rows {
        let _ = writeln!(s, "| {} |", cells(r).join(" | "));
    }
    s
}

/// The page: the table, then every chart that has a line.
fn html(runs: &[RunData], rows: &[Row], charts: &[(&str, Chart)]) -> String {
    let mut s = String::from(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>rho report</title>\n<style>body{font-family:sans-serif;max-width:860px;margin:2em auto;color:#222}table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}img{display:block;margin:1.5em 0;max-width:100%}</style></head><body>\n<h1>rho report</h1>\n<p>Runs: ",
    );
    let names: Vec<String> = runs
        .iter()
        .map(|r| format!("<code>{}</code>", escape(&r.dir.display().to_string())))
        .collect();
    s.push_str(&names.join(", "));
    s.push_str(". The first run is the baseline of the reach column.</p>\n<table>\n<tr>");
    for c in COLUMNS {
        let _ = write!(s, "<th>{}</th>", escape(c));
    }
    s.push_str("</tr>\n");
    for r in rows {
        s.push_str("<tr>");
        for c in cells(r) {
            let _ = write!(s, "<td>{}</td>", escape(&c));
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</table>\n");
    for (stem, chart) in charts.iter().filter(|(_, c)| !c.series.is_empty()) {
        let _ = writeln!(
            s,
            "<img src=\"{stem}.svg\" alt=\"{}\">",
            escape(chart.title)
        );
    }
    s.push_str("</body></html>\n");
    s
}

/// Runs `rho report`.
pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    if args.selection {
        let out = args.out.unwrap_or_else(|| PathBuf::from("report"));
        let page = selection::run(&args.selection_args, &out)?;
        eprintln!("token selection: {}", page.display());
        return Ok(());
    }
    let runs = args
        .runs
        .iter()
        .map(|d| RunData::read(d))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let out = args.out.unwrap_or_else(|| args.runs[0].join("report"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let rows = rows(&runs);
    let charts = charts(&runs);
    for (stem, chart) in charts.iter().filter(|(_, c)| !c.series.is_empty()) {
        chart.write(&out, stem)?;
    }
    let write = |name: &str, text: &str| -> anyhow::Result<()> {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("report.html", &html(&runs, &rows, &charts))?;
    write("report.md", &markdown(&rows))?;
    write("report.json", &serde_json::to_string_pretty(&rows)?)?;
    eprintln!("{}", markdown(&rows));
    eprintln!("report: {}", out.join("report.html").display());
    Ok(())
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
