//! `rho run` under faults: a selector killed with SIGKILL mid-run is replaced, its batches are
//! handed out again when their lease runs out, the trainer trains on every batch exactly once,
//! and the run ends with weights identical, bit for bit, to a run with one selector and no fault.
//! The reference model is larger than the trained one, so that the selectors are the bottleneck
//! and a killed selector is caught holding batches.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{finish, p, rho, spawn};

use serde_json::json;

fn setup(root: &Path) {
    common::synth(root, "data", 2, 100, 3);
    common::train_tokenizer(root, "data", 400);
    common::init_model(root, "20m", 1, "ref");
    common::init_model(root, "tiny", 2, "init");
}

fn run_config(root: &Path, name: &str, selectors: usize) -> std::path::PathBuf {
    // One selector per entry of `selector_devices` (the count follows from the list).
    let cfg = json!({
        "run_dir": name,
        "selector_devices": vec!["cpu"; selectors],
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
    common::last_step(&root.join(name))
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

    let consumed = common::consumed(&summary["trainer"]);
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

/// Strangers on the endpoints: garbage, unsigned and wrongly signed messages to the loader and to
/// the trainer's delivery endpoint are refused and counted; the run is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_wrongly_signed_messages_are_refused() {
    use bytes::Bytes;
    use rho_protocol::client::Consumer;
    use rho_protocol::{Credit, Fingerprint, Key, Limits, Message, ScoredBatch, TokenBatch};
    use zeromq::{DealerSocket, Socket, SocketSend, ZmqMessage};

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    rho(&[
        "synth",
        "--shards",
        "1",
        "--docs-per-shard",
        "150",
        "--out",
        &p(&root.join("data")),
    ]);
    common::train_tokenizer(root, "data", 400);
    for (name, seed) in [("ref", "1"), ("init", "2")] {
        rho(&[
            "model",
            "init",
            "--preset",
            "tiny",
            "--seed",
            seed,
            "--tokenizer",
            &p(&root.join("tokenizer.json")),
            "--out",
            &p(&root.join(name)),
        ]);
    }
    let cfg = run_config(root, "guarded", 1);
    let run = spawn(&["run", &p(&cfg)]);
    let run_dir = root.join("guarded");
    let loader_ep = common::wait_file(&run_dir.join("loader.endpoint"));
    let delivery = common::wait_file(&run_dir.join("trainer.delivery"));

    let stranger = Key::new(b"not the run's secret at all").unwrap();
    let credit = Message::Credit(Credit {
        run_id: "faults".into(),
        n: 50,
        rank: None,
    });
    let batch = TokenBatch {
        run_id: "faults".into(),
        seq: 0,
        epoch: 0,
        rows: 1,
        window: 3,
        tokenizer: Fingerprint::of_bytes(b"x"),
        tokens: vec![1, 2, 3],
        lengths: vec![3],
        doc_starts: vec![vec![0]],
        stream: None,
        rank: None,
    };
    let scored = Message::Scored(ScoredBatch {
        batch,
        ref_model: Fingerprint::of_bytes(b"y"),
        ref_loss: vec![0.0, 0.0],
    });
    for endpoint in [&loader_ep, &delivery] {
        let mut raw = DealerSocket::new();
        raw.connect(endpoint).await.unwrap();
        raw.send(ZmqMessage::from(Bytes::from_static(b"\x00\xffgarbage")))
            .await
            .unwrap();
        let unsigned = if endpoint == &loader_ep {
            credit.encode()
        } else {
            scored.encode()
        };
        raw.send(ZmqMessage::try_from(unsigned).unwrap())
            .await
            .unwrap();
        let mut signed = Consumer::connect_with(
            endpoint,
            "faults",
            Limits::default(),
            Some(stranger.clone()),
        )
        .await
        .unwrap();
        signed
            .send(if endpoint == &loader_ep {
                &credit
            } else {
                &scored
            })
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let summary = finish(run, "guarded run");
    let steps = summary["trainer"]["steps"].as_u64().unwrap();
    let consumed = common::consumed(&summary["trainer"]);
    assert_eq!(consumed, (0..steps).collect::<Vec<_>>());
    assert_eq!(
        summary["loader"]["messages_rejected"], 3,
        "garbage, unsigned and wrongly signed credits"
    );
    assert_eq!(
        summary["trainer"]["messages_rejected"], 3,
        "garbage, unsigned and wrongly signed batches"
    );
    assert_eq!(summary["trainer"]["duplicates"], 0);
}
