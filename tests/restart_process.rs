//! Faults in the middle of a run: the trainer is killed (SIGKILL) and started again, later the
//! loader is; the selector reconnects to each by itself, the restarted trainer resumes from its
//! checkpoint and tells the loader its cursor, the restarted loader is moved to that cursor.
//! The run ends with the same weights, bit for bit, as an uninterrupted one.

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::{finish, free_port, p, setup_training, spawn, wait_stopped, write};
use serde_json::{json, Value};

struct Endpoints {
    loader: String,
    delivery: String,
}

fn endpoints() -> Endpoints {
    Endpoints {
        loader: format!("tcp://127.0.0.1:{}", free_port()),
        delivery: format!("tcp://127.0.0.1:{}", free_port()),
    }
}

/// Loader, selector and trainer configs of one run in `root/name-*.json`.
fn configs(root: &Path, name: &str, ep: &Endpoints) -> [PathBuf; 3] {
    let liveness = json!({"heartbeat_secs": 0.1, "peer_timeout_secs": 1.0});
    let mut loader: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("loader.json")).unwrap()).unwrap();
    loader["endpoint"] = json!(ep.loader);
    loader["endpoint_file"] = Value::Null;
    loader["state_dir"] = json!(format!("{name}-loader-state"));
    let selector = json!({
        "run_id": "tr", "loader": ep.loader, "trainer": ep.delivery, "model": "ref",
        "tokenizer": "tokenizer.json", "liveness": liveness,
    });
    let trainer = json!({
        "run_id": "tr", "loader": ep.loader, "delivery": ep.delivery, "model": "init",
        "selection": {"score": "excess", "schedule": {"kind": "constant", "ratio": 0.6}},
        "optimizer": {"lr": 0.003, "warmup_steps": 3},
        "checkpoint": {"dir": format!("{name}-checkpoints"), "every": 5},
        "resume": true,
        "metrics": format!("{name}-trainer.metrics.jsonl"),
        "liveness": liveness,
    });
    let paths = ["loader", "selector", "trainer"].map(|k| root.join(format!("{name}-{k}.json")));
    write(&paths[0], &loader);
    write(&paths[1], &selector);
    write(&paths[2], &trainer);
    paths
}

fn start(kind: &str, config: &Path) -> Child {
    spawn(&[kind, "--config", &p(config)])
}

/// The weights of the latest checkpoint.
fn final_weights(root: &Path, name: &str) -> Vec<u8> {
    let dir = root.join(format!("{name}-checkpoints"));
    let latest = std::fs::read_to_string(dir.join("latest")).unwrap();
    std::fs::read(dir.join(latest.trim()).join("model/model.safetensors")).unwrap()
}

/// Waits until the trainer's metrics report step `step` or later.
fn wait_step(root: &Path, name: &str, step: u64) {
    let path = root.join(format!("{name}-trainer.metrics.jsonl"));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let last = common::last_metrics(&path).and_then(|v| v["step"].as_u64());
        if last.is_some_and(|s| s >= step) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the trainer never reached step {step}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

#[test]
fn trainer_then_loader_killed_and_restarted_end_with_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup_training(root);

    // Uninterrupted.
    let ep = endpoints();
    let [l, s, t] = configs(root, "clean", &ep);
    let (loader, selector, trainer) = (
        start("loader", &l),
        start("selector", &s),
        start("trainer", &t),
    );
    let clean = finish(trainer, "trainer");
    finish(loader, "loader");
    finish(selector, "selector");
    let steps = clean["steps"].as_u64().unwrap();
    assert!(
        steps > 80,
        "a run long enough to interrupt twice: {steps} steps"
    );

    // Faults.
    let ep = endpoints();
    let [l, s, t] = configs(root, "faults", &ep);
    let loader = start("loader", &l);
    let selector = start("selector", &s);
    let mut trainer = start("trainer", &t);

    // The trainer dies mid-run: the loader is paused so that the stream is certainly not over.
    wait_step(root, "faults", 20);
    signal(&loader, "-STOP");
    wait_stopped(loader.id());
    trainer.kill().unwrap();
    trainer.wait().unwrap();
    signal(&loader, "-CONT");
    let trainer = start("trainer", &t);

    // Then the loader dies mid-run and a new one starts on the same endpoint.
    wait_step(root, "faults", 50);
    signal(&loader, "-STOP");
    wait_stopped(loader.id());
    let mut loader = loader;
    loader.kill().unwrap();
    loader.wait().unwrap();
    let loader = start("loader", &l);

    let report = finish(trainer, "restarted trainer");
    finish(loader, "restarted loader");
    let selector_report = finish(selector, "selector");

    // The restarted trainer resumed at a checkpoint and trained every later batch once, in order.
    let consumed = common::consumed(&report);
    let first = consumed[0];
    assert!(first > 0 && first.is_multiple_of(5), "resumed at {first}");
    assert_eq!(consumed, (first..steps).collect::<Vec<_>>());
    assert_eq!(report["steps"].as_u64().unwrap(), steps);
    assert!(report["reconnects"].as_u64().unwrap() >= 1, "{report}");
    assert!(
        selector_report["reconnects"].as_u64().unwrap() >= 2,
        "{selector_report}"
    );

    assert!(
        final_weights(root, "clean") == final_weights(root, "faults"),
        "the interrupted run ended with other weights"
    );
}
