//! `rho run` under faults: a selector killed with SIGKILL mid-run is replaced, its batches are
//! handed out again when their lease runs out, the trainer trains on every batch exactly once,
//! and the run ends with weights identical, bit for bit, to a run with one selector and no fault.
//! The reference model is larger than the trained one, so that the selectors are the bottleneck
//! and a killed selector is caught holding batches.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{finish, p, rho, spawn};
use serde_json::{json, Value};

fn setup(root: &Path) {
    rho(&[
        "synth",
        "--shards",
        "2",
        "--docs-per-shard",
        "100",
        "--seed",
        "3",
        "--out",
        &p(&root.join("data")),
    ]);
    rho(&[
        "tokenizer",
        "train",
        "--vocab-size",
        "400",
        "--input",
        &p(&root.join("data")),
        "--out",
        &p(&root.join("tokenizer.json")),
    ]);
    rho(&[
        "model",
        "init",
        "--preset",
        "20m",
        "--seed",
        "1",
        "--tokenizer",
        &p(&root.join("tokenizer.json")),
        "--out",
        &p(&root.join("ref")),
    ]);
    rho(&[
        "model",
        "init",
        "--preset",
        "tiny",
        "--seed",
        "2",
        "--tokenizer",
        &p(&root.join("tokenizer.json")),
        "--out",
        &p(&root.join("init")),
    ]);
}

fn run_config(root: &Path, name: &str, selectors: usize) -> std::path::PathBuf {
    let cfg = json!({
        "run_dir": name,
        "selectors": selectors,
        "loader": {"run_id": "faults", "data": {"paths": ["data"]}, "tokenizer": "tokenizer.json",
                   "seq_len": 64, "batch_size": 4, "lease_secs": 1.0, "metrics_interval_secs": 0.2},
        "selector": {"model": "ref", "tokenizer": "tokenizer.json"},
        "trainer": {"model": "init", "selection": {"score": "excess"}, "optimizer": {"lr": 0.003}},
    });
    let path = root.join(format!("{name}.run.json"));
    std::fs::write(&path, cfg.to_string()).unwrap();
    path
}

fn weights(root: &Path, name: &str) -> Vec<u8> {
    let dir = root.join(name).join("checkpoints");
    let latest = std::fs::read_to_string(dir.join("latest")).unwrap();
    std::fs::read(
        dir.join(latest.trim())
            .join("model")
            .join("model.safetensors"),
    )
    .unwrap()
}

fn last_step(root: &Path, name: &str) -> u64 {
    std::fs::read_to_string(root.join(name).join("trainer.metrics.jsonl"))
        .ok()
        .and_then(|t| {
            t.lines()
                .last()
                .and_then(|l| serde_json::from_str::<Value>(l).ok())
        })
        .and_then(|v| v["step"].as_u64())
        .unwrap_or(0)
}

#[test]
fn a_selector_killed_mid_run_loses_nothing_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);

    let clean = finish(
        spawn(&["run", &p(&run_config(root, "one", 1))]),
        "run with one selector",
    );
    let steps = clean["trainer"]["steps"].as_u64().unwrap();
    assert!(steps > 30, "{steps} steps");

    let faulty = spawn(&["run", &p(&run_config(root, "two", 2))]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while last_step(root, "two") < 5 {
        assert!(
            Instant::now() < deadline,
            "the run with two selectors never got going"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = std::fs::read_to_string(root.join("two").join("selector-0.pid")).unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap();
    assert!(killed.success());
    let summary = finish(faulty, "run with a killed selector");

    let consumed: Vec<u64> = summary["trainer"]["consumed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(
        consumed,
        (0..steps).collect::<Vec<_>>(),
        "every batch once, in order"
    );
    assert!(
        summary["selector_restarts"].as_u64().unwrap() >= 1,
        "the killed selector was not replaced"
    );
    assert!(
        summary["loader"]["redeliveries"].as_u64().unwrap() >= 1,
        "nothing was handed out again"
    );
    assert!(
        weights(root, "one") == weights(root, "two"),
        "the final weights differ"
    );
}
