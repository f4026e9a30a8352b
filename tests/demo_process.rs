//! `rho demo --quick`: the whole method through real `rho run` pipelines, and a report that
//! holds what those runs measured.

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
    rho(&["demo", "--quick", "--seed", "3", "--out", &p(&out)]);

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
        "noise_share_selected_by_excess",
        "noise_share_selected_by_reference",
    ] {
        let v = sel[key].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
    }
    assert!(sel["noise_share_of_corpus"].as_f64().unwrap() > 0.2);

    for file in ["loss.svg", "loss.png", "report.md"] {
        assert!(
            std::fs::metadata(out.join(file)).unwrap().len() > 100,
            "{file}"
        );
    }
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    let html = std::fs::read_to_string(out.join("selection.html")).unwrap();
    assert!(html.contains("class=\"kept\"") && html.contains("noise"));

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
        page.contains("class=\"kept\"") && page.contains("excess"),
        "{page}"
    );
    // No labels of noise where the data has none.
    assert!(!page.contains("class=\"noise"), "{page}");
    assert!(page.contains("of 128 tokens kept"), "{page}");
}
