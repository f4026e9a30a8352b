//! `rho demo --quick --ablations`: the whole method and its ablations through real `rho run`
//! pipelines, and a report that holds what those runs measured.

mod common;

use common::{p, rho};
use serde_json::Value;

fn read(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn quick_demo_reports_what_its_runs_measured() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    rho(&[
        "demo",
        "--quick",
        "--ablations",
        "--seed",
        "3",
        "--out",
        &p(&out),
    ]);

    let report = read(&out.join("report.json"));
    for key in [
        "causal_final_eval_loss",
        "slm_final_eval_loss",
        "slm_tokens_to_causal_final_fraction",
        "tokens_per_run",
        "wall_seconds",
    ] {
        assert!(report.get(key).is_some(), "report.json lacks `{key}`");
    }
    assert!(report["wall_seconds"].as_f64().unwrap() > 0.0);

    // Every target run, by rule: causal LM, SLM, then the ablations, each with its own
    // pipeline; the last evaluation of its trainer is its final loss.
    let rules = report["rules"].as_array().unwrap();
    let names: Vec<&str> = rules.iter().map(|r| r["rule"].as_str().unwrap()).collect();
    assert_eq!(names, ["none", "excess", "reference", "current", "random"]);
    let causal_final = report["causal_final_eval_loss"].as_f64().unwrap();
    for r in rules {
        let run = r["run"].as_str().unwrap();
        let trainer = read(&out.join("runs").join(run).join("trainer.report.json"));
        let last = trainer["evals"].as_array().unwrap().last().unwrap()["loss"]
            .as_f64()
            .unwrap();
        assert!(
            (r["final_eval_loss"].as_f64().unwrap() - last).abs() < 1e-6,
            "{run}"
        );
        let minus = r["minus_causal"].as_f64().unwrap();
        assert!((minus - (last - causal_final)).abs() < 1e-6, "{run}");
        // Same stream, same budget.
        assert_eq!(
            common::consumed(&trainer),
            (0..report["steps_per_run"].as_u64().unwrap()).collect::<Vec<_>>(),
            "{run}"
        );
        // A selector scores for the rules that need the reference, and only for those.
        let scored = out
            .join("runs")
            .join(run)
            .join("selector-0.report.json")
            .exists();
        assert_eq!(
            scored,
            matches!(r["rule"].as_str(), Some("excess" | "reference")),
            "{run}"
        );
        // Each kept k% of every step (the control too), causal LM every token.
        let metrics =
            std::fs::read_to_string(out.join("runs").join(run).join("trainer.metrics.jsonl"))
                .unwrap();
        for line in metrics.lines() {
            let m: Value = serde_json::from_str(line).unwrap();
            let kept = m["selected_fraction"].as_f64().unwrap();
            let want = if r["rule"] == "none" {
                1.0
            } else {
                report["ratio"].as_f64().unwrap()
            };
            assert!((kept - want).abs() < 1e-3, "{run}: kept {kept}");
        }
    }
    // The random rule is seeded: its config names the seed, and its masks differ from step
    // to step (so do its losses of the selected tokens against those of all tokens).
    let random = read(&out.join("runs/ablation-random/trainer.json"));
    assert_eq!(random["selection"]["score"], "random");
    assert!(random["selection"]["seed"].is_u64());

    // Compute: 6N per token of every batch, 2N_ref per scored token, the reference's own
    // training on top; the ratios follow from the interpolated fractions.
    let c = &report["compute"];
    let n = c["target_parameters"].as_f64().unwrap();
    let n_ref = c["reference_parameters"].as_f64().unwrap();
    let tokens = report["tokens_per_run"].as_f64().unwrap();
    assert!(n > 0.0 && n_ref > 0.0);
    assert!((c["causal_flops"].as_f64().unwrap() - 6.0 * n * tokens).abs() < 1.0);
    assert!((c["slm_flops"].as_f64().unwrap() - (6.0 * n + 2.0 * n_ref) * tokens).abs() < 1.0);
    let ref_tokens = report["reference_steps"].as_f64().unwrap()
        * report["batch"][0].as_f64().unwrap()
        * report["batch"][1].as_f64().unwrap();
    let ref_flops = c["reference_training_flops"].as_f64().unwrap();
    assert!((ref_flops - 6.0 * n_ref * ref_tokens).abs() < 1.0);
    if let Some(f) = rules[1]["tokens_to_causal_final_fraction_interpolated"].as_f64() {
        let ratio = c["slm_to_causal_final_ratio"].as_f64().unwrap();
        let want = f * (6.0 * n + 2.0 * n_ref) / (6.0 * n);
        assert!((ratio - want).abs() < 1e-9, "{ratio} vs {want}");
        let with = c["slm_to_causal_final_ratio_with_reference_training"]
            .as_f64()
            .unwrap();
        assert!((with - ratio - ref_flops / (6.0 * n * tokens)).abs() < 1e-9);
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for label in [
        "causal LM",
        "excess loss",
        "reference loss alone",
        "own loss",
        "random",
    ] {
        assert!(md.contains(label), "report.md lacks `{label}`");
    }
    assert!(md.contains("x causal LM") && md.contains("FLOPs"), "{md}");
    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(svg.contains("random") && svg.contains("reference loss alone"));

    // Each final loss is the last evaluation its trainer process reported.
    for (run, key) in [
        ("causal", "causal_final_eval_loss"),
        ("slm", "slm_final_eval_loss"),
    ] {
        let trainer = read(&out.join("runs").join(run).join("trainer.report.json"));
        let evals = trainer["evals"].as_array().unwrap();
        assert!(evals.len() >= 21, "{run}: evaluate at least every 5%");
        let last = evals.last().unwrap()["loss"].as_f64().unwrap();
        assert!((report[key].as_f64().unwrap() - last).abs() < 1e-6, "{run}");
        // Same budget: both runs trained the same number of steps, consuming batches 0..N.
        let steps = trainer["steps"].as_u64().unwrap();
        assert_eq!(steps, report["steps_per_run"].as_u64().unwrap());
        let consumed = common::consumed(&trainer);
        assert_eq!(consumed, (0..steps).collect::<Vec<_>>(), "{run}");
        let [rows, len] = [0, 1].map(|i| report["batch"][i].as_u64().unwrap());
        assert_eq!(
            report["tokens_per_run"].as_u64().unwrap(),
            steps * rows * len
        );
    }
    // The SLM run had a selector process scoring with the reference model.
    let selector = read(&out.join("runs/slm/selector-0.report.json"));
    assert!(selector["batches"].as_u64().unwrap() > 0);
    assert!(!out.join("runs/causal/selector-0.report.json").exists());

    // The fraction, where reached, is an evaluation point of the SLM run.
    if let Some(f) = report["slm_tokens_to_causal_final_fraction"].as_f64() {
        assert!(f > 0.0 && f <= 1.0, "{f}");
        let target = report["causal_final_eval_loss"].as_f64().unwrap();
        let budget = report["tokens_per_run"].as_f64().unwrap();
        let first = report["evals"]["slm"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["loss"].as_f64().unwrap() <= target)
            .unwrap();
        assert!((first["tokens"].as_f64().unwrap() / budget - f).abs() < 1e-9);
    }

    // Selection precision against the generator's noise labels.
    let sel = &report["selection"];
    for key in [
        "noise_share_of_corpus",
        "easy_share_of_corpus",
        "noise_share_selected_by_excess",
        "noise_share_selected_by_reference",
    ] {
        let v = sel[key].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
    }
    assert!(sel["noise_share_of_corpus"].as_f64().unwrap() > 0.2);
    assert!(sel["easy_share_of_corpus"].as_f64().unwrap() > 0.1);
    for rule in ["excess", "reference", "current", "random"] {
        let v = sel["noise_share_selected"][rule].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&v), "{rule}: {v}");
        for kind in ["clean", "easy", "id"] {
            let k = sel["by_kind"][kind]["kept"][rule].as_f64().unwrap_or(-1.0);
            assert!((0.0..=1.0).contains(&k), "{kind} by {rule}: {k}");
        }
    }
    // The random control keeps about k of every kind, noise included.
    let noise = sel["noise_share_of_corpus"].as_f64().unwrap();
    let random_noise = sel["noise_share_selected"]["random"].as_f64().unwrap();
    assert!(
        (random_noise - noise).abs() < 0.1,
        "{random_noise} vs {noise}"
    );

    for file in ["loss.svg", "loss.png", "report.md"] {
        assert!(
            std::fs::metadata(out.join(file)).unwrap().len() > 100,
            "{file}"
        );
    }
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    let html = std::fs::read_to_string(out.join("selection.html")).unwrap();
    assert!(html.contains("kept k0") && html.contains("noise") && html.contains("class=\"easy"));
    // A menu shows what each rule keeps; every rule keeps some token of the page.
    for (r, rule) in ["excess", "reference", "current", "random"]
        .iter()
        .enumerate()
    {
        assert!(
            html.contains(&format!("<option value=\"{r}\">{rule}")),
            "{rule}"
        );
        assert!(
            html.contains(&format!(" k{r}")),
            "{rule} keeps nothing shown"
        );
    }

    // `rho report` reads any runs back: the demo's two target runs here.
    let cmp = out.join("compare");
    rho(&[
        "report",
        &p(&out.join("runs/causal")),
        &p(&out.join("runs/slm")),
        "--out",
        &p(&cmp),
    ]);
    let rows = read(&cmp.join("report.json"));
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, key) in rows
        .iter()
        .zip(["causal_final_eval_loss", "slm_final_eval_loss"])
    {
        let got = row["final_eval_loss"].as_f64().unwrap();
        assert!((got - report[key].as_f64().unwrap()).abs() < 1e-6, "{key}");
        assert_eq!(row["steps"].as_u64(), report["steps_per_run"].as_u64());
    }
    // The baseline reaches its own final loss with all of its tokens, or before.
    assert!(rows[0]["tokens_to_baseline_final"].as_f64().unwrap() <= 1.0);
    let page = std::fs::read_to_string(cmp.join("report.html")).unwrap();
    assert!(page.contains("causal") && page.contains("slm"), "{page}");
    for chart in [
        "eval_loss",
        "train_loss",
        "throughput",
        "data_wait",
        "selected_fraction",
    ] {
        assert!(page.contains(&format!("{chart}.svg")), "{chart}");
        let svg = std::fs::read_to_string(cmp.join(format!("{chart}.svg"))).unwrap();
        assert!(svg.contains("<svg") && svg.contains("slm"), "{chart}");
        assert_eq!(
            &std::fs::read(cmp.join(format!("{chart}.png"))).unwrap()[..4],
            b"\x89PNG"
        );
    }

    // The selection view of any checkpoints and data: a fresh model (not one the demo trained)
    // against the demo's reference, on a shard of the training corpus.
    let other = out.join("other-model");
    rho(&[
        "model",
        "init",
        "--preset",
        "tiny",
        "--seed",
        "9",
        "--tokenizer",
        &p(&out.join("tokenizer.json")),
        "--out",
        &p(&other),
    ]);
    let checkpoints = out.join("runs/reference/checkpoints");
    let latest = std::fs::read_to_string(checkpoints.join("latest")).unwrap();
    let reference = checkpoints.join(latest.trim()).join("model");
    let sel = out.join("selection-view");
    rho(&[
        "report",
        "--selection",
        "--reference",
        &p(&reference),
        "--model",
        &p(&other),
        "--input",
        &p(&out.join("data/train/shard-00000.parquet")),
        "--tokenizer",
        &p(&out.join("tokenizer.json")),
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--batches",
        "1",
        "--out",
        &p(&sel),
    ]);
    let page = std::fs::read_to_string(sel.join("selection.html")).unwrap();
    assert!(
        page.contains("kept k0") && page.contains("excess"),
        "{page}"
    );
    // No labels of noise where the data has none.
    assert!(!page.contains("class=\"noise"), "{page}");
    assert!(page.contains("of 128 tokens kept"), "{page}");
}
