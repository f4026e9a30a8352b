//! Real `rho loader` + `rho selector` + `rho trainer` processes train a tiny model: the held-out
//! loss falls, every batch is trained on once in order, and the checkpoint is a loadable
//! HuggingFace directory. Plain causal LM (no selector) trains from the loader directly.

use std::path::Path;

use serde_json::{json, Value};

mod common;

use common::{finish, free_port, p, setup_training as setup, spawn, wait_file, write};

fn trainer_config(root: &Path, loader_ep: &str, score: &str, dir: &str) -> std::path::PathBuf {
    let cfg = json!({
        "run_id": "tr", "loader": loader_ep, "delivery": "tcp://127.0.0.1:0",
        "delivery_file": format!("{dir}.delivery"), "model": "init",
        "selection": {"score": score, "schedule": {"kind": "constant", "ratio": 0.6}},
        "optimizer": {"lr": 0.003, "warmup_steps": 3, "weight_decay": 0.0},
        "checkpoint": {"dir": dir, "every": 10},
        "eval": {"loader_config": "heldout.json", "every": 5, "max_batches": 4},
        "metrics": format!("{dir}.metrics.jsonl"),
    });
    let path = root.join(format!("{dir}.json"));
    write(&path, &cfg);
    path
}

fn check_training(report: &Value, root: &Path, dir: &str) {
    let consumed = common::consumed(report);
    assert!(consumed.len() >= 20, "only {} steps", consumed.len());
    assert_eq!(
        consumed,
        (0..consumed.len() as u64).collect::<Vec<_>>(),
        "in order, each once"
    );
    let evals = report["evals"].as_array().unwrap();
    let first = evals.first().unwrap()["loss"].as_f64().unwrap();
    let last = evals.last().unwrap()["loss"].as_f64().unwrap();
    assert!(last < first - 0.3, "held-out loss {first} -> {last}");
    let metrics = std::fs::read_to_string(root.join(format!("{dir}.metrics.jsonl"))).unwrap();
    let line: Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    for key in [
        "loss_selected",
        "loss_all",
        "selected_fraction",
        "mean_excess",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "data_wait_fraction",
    ] {
        assert!(line.get(key).is_some(), "metrics lack {key}");
    }
    // The final checkpoint loads as a HuggingFace directory.
    let ck = Path::new(report["last_checkpoint"].as_str().unwrap());
    assert!(ck.starts_with(root.join(dir)));
    common::assert_model_loads(ck);
}

#[test]
fn slm_through_loader_selector_and_trainer_processes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    let loader = spawn(&["loader", "--config", &p(&root.join("loader.json"))]);
    let loader_ep = wait_file(&root.join("loader.endpoint"));
    let trainer = spawn(&[
        "trainer",
        "--config",
        &p(&trainer_config(root, &loader_ep, "excess", "slm")),
    ]);
    let delivery = wait_file(&root.join("slm.delivery"));
    let sel = json!({"run_id": "tr", "loader": loader_ep, "trainer": delivery, "model": "ref", "tokenizer": "tokenizer.json"});
    write(&root.join("selector.json"), &sel);
    let selector = spawn(&["selector", "--config", &p(&root.join("selector.json"))]);
    let report = finish(trainer, "trainer");
    check_training(&report, root, "slm");
    let line = common::last_metrics(&root.join("slm.metrics.jsonl")).unwrap();
    let frac = line["selected_fraction"].as_f64().unwrap();
    assert!((frac - 0.6).abs() < 0.01, "selected fraction {frac}");
    let l = finish(loader, "loader");
    assert_eq!(l["counts"]["batches_acked"], report["steps"]);
    finish(selector, "selector");
}

#[test]
fn causal_lm_trains_from_the_loader_directly() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    let loader = spawn(&["loader", "--config", &p(&root.join("loader.json"))]);
    let loader_ep = wait_file(&root.join("loader.endpoint"));
    let trainer = spawn(&[
        "trainer",
        "--config",
        &p(&trainer_config(root, &loader_ep, "none", "clm")),
    ]);
    let report = finish(trainer, "trainer");
    check_training(&report, root, "clm");
    let line = common::last_metrics(&root.join("clm.metrics.jsonl")).unwrap();
    assert_eq!(line["selected_fraction"].as_f64().unwrap(), 1.0);
    finish(loader, "loader");
}

/// Gives the setup's loader a lease of `secs` seconds, so that refused batches go back soon.
fn short_lease(root: &Path, secs: f64) {
    let path = root.join("loader.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["lease_secs"] = json!(secs);
    write(&path, &cfg);
}

/// A loader, a trainer of config `trainer` (its loader and delivery endpoint filled in) and a
/// stand-in selector's two connections: `up` to the loader, `down` to the trainer (introduced).
struct StandIn {
    loader: std::process::Child,
    trainer: std::process::Child,
    loader_ep: String,
    delivery: String,
    up: rho_protocol::client::Consumer,
    down: rho_protocol::client::Consumer,
}

async fn stand_in(root: &Path, name: &str, mut trainer: Value) -> StandIn {
    use rho_protocol::client::Consumer;
    use rho_protocol::{Limits, Role};
    let loader = spawn(&["loader", "--config", &p(&root.join("loader.json"))]);
    let loader_ep = wait_file(&root.join("loader.endpoint"));
    trainer["run_id"] = json!("tr");
    trainer["loader"] = json!(loader_ep);
    trainer["delivery"] = json!("tcp://127.0.0.1:0");
    trainer["delivery_file"] = json!(format!("{name}.delivery"));
    write(&root.join(format!("{name}.json")), &trainer);
    let trainer = spawn(&[
        "trainer",
        "--config",
        &p(&root.join(format!("{name}.json"))),
    ]);
    let delivery = wait_file(&root.join(format!("{name}.delivery")));
    let up = Consumer::connect(&loader_ep, "tr", Limits::default())
        .await
        .unwrap();
    let mut down = Consumer::connect(&delivery, "tr", Limits::default())
        .await
        .unwrap();
    down.heartbeat(Role::Selector).await.unwrap();
    StandIn {
        loader,
        trainer,
        loader_ep,
        delivery,
        up,
        down,
    }
}

/// The next `n` token batches the loader sends to `up`, after asking for them.
async fn take_batches(
    up: &mut rho_protocol::client::Consumer,
    n: usize,
) -> Vec<rho_protocol::TokenBatch> {
    up.credit(n as u32).await.unwrap();
    let mut batches = Vec::new();
    while batches.len() < n {
        if let rho_protocol::Message::Batch(b) = up.recv().await.unwrap() {
            batches.push(b);
        }
    }
    batches
}

/// A stand-in selector delivers scored batches out of order and once twice: the trainer trains
/// them in sequence order, once each, and counts the duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_and_duplicate_deliveries() {
    use rho_protocol::{Message, ScoredBatch};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    let trainer = json!({"backend": "null", "max_steps": 3, "credits_per_selector": 8});
    let StandIn {
        mut loader,
        trainer,
        mut up,
        mut down,
        ..
    } = stand_in(root, "null", trainer).await;
    let batches = take_batches(&mut up, 3).await;
    let scored = |b: &rho_protocol::TokenBatch| {
        let n = b.rows * (b.window - 1);
        Message::Scored(ScoredBatch {
            batch: b.clone(),
            ref_model: rho_protocol::Fingerprint::of_bytes(b"r"),
            ref_loss: vec![1.0; n],
        })
    };
    for i in [2, 0, 0, 1] {
        down.send(&scored(&batches[i])).await.unwrap();
    }
    let report = finish(trainer, "trainer");
    assert_eq!(report["consumed"], json!([0, 1, 2]));
    assert_eq!(report["duplicates"], 1);
    let _ = loader.kill();
    let _ = loader.wait();
}

/// Rule: reference losses that are not finite are never trained on. A stand-in selector sends
/// a batch with a NaN reference loss at a valid position: the trainer refuses it and tells the
/// stand-in to stop, naming the batch and the position; the stand-in goes away, the loader's
/// lease hands its batches to a real selector, and every batch is trained exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nan_reference_loss_is_refused_and_the_batch_scored_again() {
    use rho_protocol::{Message, ScoredBatch};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    short_lease(root, 2.0);
    let trainer = json!({"backend": "null", "metrics": "nan.metrics.jsonl"});
    let StandIn {
        loader,
        trainer,
        loader_ep,
        delivery,
        mut up,
        mut down,
    } = stand_in(root, "nan", trainer).await;
    let batch = take_batches(&mut up, 1).await.remove(0);
    let mut ref_loss = vec![1.0; batch.rows * (batch.window - 1)];
    ref_loss[3] = f32::NAN;
    let seq = batch.seq;
    down.send(&Message::Scored(ScoredBatch {
        batch,
        ref_model: rho_protocol::Fingerprint::of_bytes(b"r"),
        ref_loss,
    }))
    .await
    .unwrap();
    let reason = loop {
        match tokio::time::timeout(std::time::Duration::from_secs(30), down.recv()).await {
            Ok(Ok(Message::Shutdown(s))) => break s.reason,
            Ok(Ok(_)) => continue,
            other => panic!("no shutdown from the trainer: {other:?}"),
        }
    };
    assert!(reason.contains(&format!("batch {seq}")), "{reason}");
    assert!(reason.contains("row 0, position 3 is NaN"), "{reason}");
    drop(up);
    drop(down);
    let sel = json!({"run_id": "tr", "loader": loader_ep, "trainer": delivery, "model": "ref", "tokenizer": "tokenizer.json"});
    write(&root.join("nan-selector.json"), &sel);
    let selector = spawn(&["selector", "--config", &p(&root.join("nan-selector.json"))]);
    let report = finish(trainer, "trainer");
    let steps = report["steps"].as_u64().unwrap();
    assert_eq!(common::consumed(&report), (0..steps).collect::<Vec<_>>());
    assert_eq!(report["reference_refused"], 1);
    finish(loader, "loader");
    finish(selector, "selector");
}

/// Processes may start in any order: here the trainer first, then the selector, the loader last.
#[test]
fn processes_start_in_reverse_order() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    let (lp, dp) = (free_port(), free_port());
    let loader_ep = format!("tcp://127.0.0.1:{lp}");
    let delivery_ep = format!("tcp://127.0.0.1:{dp}");
    let cfg = json!({
        "run_id": "tr", "loader": loader_ep, "delivery": delivery_ep, "model": "init",
        "selection": {"score": "excess"}, "optimizer": {"lr": 0.003},
    });
    write(&root.join("rev-trainer.json"), &cfg);
    let trainer = spawn(&["trainer", "--config", &p(&root.join("rev-trainer.json"))]);
    // The trainer binds its delivery endpoint first, then waits for the loader.
    common::wait_listening(dp);
    let sel = json!({"run_id": "tr", "loader": loader_ep, "trainer": delivery_ep, "model": "ref", "tokenizer": "tokenizer.json"});
    write(&root.join("rev-selector.json"), &sel);
    let selector = spawn(&["selector", "--config", &p(&root.join("rev-selector.json"))]);
    // A pause, not a wait: a selector shows nothing outside until the loader it waits for is
    // up, and the point here is that the loader starts last.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let loader = spawn(&[
        "loader",
        "--config",
        &p(&root.join("loader.json")),
        "--endpoint",
        &loader_ep,
    ]);
    let report = finish(trainer, "trainer");
    let steps = report["steps"].as_u64().unwrap();
    assert!(steps > 20);
    let consumed = common::consumed(&report);
    assert_eq!(consumed, (0..steps).collect::<Vec<_>>());
    finish(loader, "loader");
    finish(selector, "selector");
}

/// Rule: one reference per run. A second selector whose reference is another model joins
/// mid-run: none of its batches is trained on, it is told to stop and exits naming both
/// fingerprints, the trainer counts the refusals, and every batch is trained exactly once, with
/// the scores of the run's reference (the leases hand the refused batches to the first
/// selector).
#[test]
fn batches_of_another_reference_are_refused_and_scored_again() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    short_lease(root, 2.0);
    let loader = spawn(&["loader", "--config", &p(&root.join("loader.json"))]);
    let loader_ep = wait_file(&root.join("loader.endpoint"));
    let trainer = spawn(&[
        "trainer",
        "--config",
        &p(&trainer_config(root, &loader_ep, "excess", "mixed")),
    ]);
    let delivery = wait_file(&root.join("mixed.delivery"));
    let selector = |name: &str, model: &str| {
        let sel = json!({"run_id": "tr", "loader": loader_ep, "trainer": delivery, "model": model, "tokenizer": "tokenizer.json"});
        let path = root.join(format!("{name}.json"));
        write(&path, &sel);
        spawn(&["selector", "--config", &p(&path)])
    };
    let right = selector("right", "ref");
    let metrics = root.join("mixed.metrics.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while common::last_metrics(&metrics).is_none_or(|m| m["step"].as_u64() < Some(2)) {
        assert!(std::time::Instant::now() < deadline, "no step 2");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let wrong = selector("wrong", "init");
    let out = wrong.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the other reference's selector ended well: {said}"
    );
    let fp = |m: &str| rho_selector::scorer::model_fingerprint(&root.join(m)).unwrap();
    for f in [fp("ref"), fp("init")] {
        assert!(said.contains(f.as_str()), "its error names {f}: {said}");
    }
    assert!(
        said.contains("the trainer asked this selector to stop"),
        "{said}"
    );

    let report = finish(trainer, "trainer");
    let steps = report["steps"].as_u64().unwrap();
    assert_eq!(
        common::consumed(&report),
        (0..steps).collect::<Vec<_>>(),
        "every batch once, in order"
    );
    assert!(report["reference_refused"].as_u64().unwrap() >= 1);
    let last = common::last_metrics(&metrics).unwrap();
    assert_eq!(last["reference_refused"], report["reference_refused"]);
    let l = finish(loader, "loader");
    assert_eq!(l["counts"]["batches_acked"], report["steps"]);
    finish(right, "selector");
    // The checkpoint names the run's reference.
    let ck = Path::new(report["last_checkpoint"].as_str().unwrap());
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["stream"]["reference"], json!(fp("ref").as_str()));
}
