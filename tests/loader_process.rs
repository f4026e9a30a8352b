//! The real `rho loader` process, driven by a client written from docs/PROTOCOL.md alone: raw
//! ZeroMQ DEALER frames and JSON headers, no rho library code on the wire.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

const RHO: &str = env!("CARGO_BIN_EXE_rho");

struct Run {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

/// A corpus (via `rho synth`) and a tokenizer (via `rho tokenizer train`).
fn setup() -> Run {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let ok = Command::new(RHO)
        .args(["synth", "--shards", "3", "--docs-per-shard", "60", "--out"])
        .arg(root.join("data"))
        .status()
        .unwrap();
    assert!(ok.success());
    let ok = Command::new(RHO)
        .args(["tokenizer", "train", "--vocab-size", "600", "--input"])
        .arg(root.join("data"))
        .arg("--out")
        .arg(root.join("tokenizer.json"))
        .status()
        .unwrap();
    assert!(ok.success());
    Run { _dir: dir, root }
}

fn write_config(root: &Path, name: &str, extra: Value) -> PathBuf {
    let mut cfg = json!({
        "run_id": "it",
        "data": {"paths": ["data"]},
        "tokenizer": "tokenizer.json",
        "seq_len": 64,
        "batch_size": 2,
        "endpoint": "tcp://127.0.0.1:0",
        "endpoint_file": format!("{name}.endpoint"),
        "max_in_flight": 4,
        "metrics": format!("{name}.metrics.jsonl"),
        "metrics_interval_secs": 0.2,
    });
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    let path = root.join(format!("{name}.json"));
    std::fs::write(&path, cfg.to_string()).unwrap();
    path
}

fn start(root: &Path, name: &str, config: &Path) -> (std::process::Child, String) {
    let mut child = Command::new(RHO)
        .arg("loader")
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let file = root.join(format!("{name}.endpoint"));
    match rho_protocol::producer::wait_endpoint(&file, Duration::from_secs(60)) {
        Some(endpoint) => (child, endpoint),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the loader never listened");
        }
    }
}

struct Client {
    socket: DealerSocket,
}

impl Client {
    async fn connect(endpoint: &str) -> Client {
        let mut socket = DealerSocket::new();
        socket.connect(endpoint).await.unwrap();
        Client { socket }
    }

    async fn send(&mut self, header: Value) {
        self.send_frames(vec![Bytes::from(header.to_string())])
            .await;
    }

    async fn send_frames(&mut self, frames: Vec<Bytes>) {
        self.socket
            .send(ZmqMessage::try_from(frames).unwrap())
            .await
            .unwrap();
    }

    /// The next message as (header, tensor frames), or None after `wait`.
    async fn recv(&mut self, wait: Duration) -> Option<(Value, Vec<Bytes>)> {
        let m = tokio::time::timeout(wait, self.socket.recv())
            .await
            .ok()?
            .unwrap();
        let mut frames = m.into_vec();
        let header: Value = serde_json::from_slice(&frames.remove(0)).unwrap();
        Some((header, frames))
    }
}

fn credit(n: u32) -> Value {
    json!({"rho": 1, "kind": "credit", "run_id": "it", "n": n})
}

fn ack(seqs: &[u64]) -> Value {
    json!({"rho": 1, "kind": "ack", "run_id": "it", "seqs": seqs})
}

/// Checks a batch against the spec and returns (seq, token ids).
fn check_batch(h: &Value, frames: &[Bytes]) -> (u64, Vec<u32>) {
    assert_eq!(h["rho"], 1);
    assert_eq!(h["kind"], "batch");
    assert_eq!(h["run_id"], "it");
    assert!(h["tokenizer"].as_str().unwrap().starts_with("sha256:"));
    let t = &h["tensors"][0];
    assert_eq!(
        (t["name"].as_str(), t["dtype"].as_str()),
        (Some("tokens"), Some("u32"))
    );
    let (rows, window) = (
        t["shape"][0].as_u64().unwrap(),
        t["shape"][1].as_u64().unwrap(),
    );
    assert_eq!(window, 65);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].len() as u64, rows * window * 4);
    assert_eq!(h["lengths"].as_array().unwrap().len() as u64, rows);
    let ids = frames[0]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (h["seq"].as_u64().unwrap(), ids)
}

/// Drains the whole stream with credits and acks; returns batches by sequence number.
async fn drain(client: &mut Client, credits: u32) -> (Vec<(u64, Vec<u32>)>, u64) {
    drain_rank(client, credits, None).await
}

/// [`drain`] as rank `rank` of `world` (credits name it; every batch must be tagged with it).
async fn drain_rank(
    client: &mut Client,
    credits: u32,
    rank: Option<(u32, u32)>,
) -> (Vec<(u64, Vec<u32>)>, u64) {
    let credit = |n: u32| {
        let mut c = credit(n);
        if let Some((r, w)) = rank {
            c["rank"] = r.into();
            c["world"] = w.into();
        }
        c
    };
    client.send(credit(credits)).await;
    let mut got = Vec::new();
    loop {
        let (h, frames) = client
            .recv(Duration::from_secs(30))
            .await
            .expect("loader went silent");
        match h["kind"].as_str().unwrap() {
            "batch" => {
                let (seq, ids) = check_batch(&h, &frames);
                let tag = (h["rank"].as_u64(), h["world"].as_u64());
                let want = rank.map(|(r, w)| (u64::from(r), u64::from(w)));
                assert_eq!(tag, want.unzip(), "batch {seq}: its rank");
                client.send(ack(&[seq])).await;
                client.send(credit(1)).await;
                got.push((seq, ids));
            }
            "end" => return (got, h["total"].as_u64().unwrap()),
            k => panic!("unexpected {k}"),
        }
    }
}

fn report(child: std::process::Child) -> Value {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "loader exited with {}", out.status);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_window_acks_end_and_refusals() {
    let run = setup();
    let cfg = write_config(&run.root, "a", json!({}));
    let (child, endpoint) = start(&run.root, "a", &cfg);
    let mut c = Client::connect(&endpoint).await;

    // Nothing arrives unasked.
    assert!(c.recv(Duration::from_millis(300)).await.is_none());
    // Garbage, a wrong version and another run's message are refused, and change nothing.
    c.send_frames(vec![Bytes::from_static(b"\x00garbage")])
        .await;
    c.send(json!({"rho": 9, "kind": "credit", "run_id": "it", "n": 5}))
        .await;
    c.send(json!({"rho": 1, "kind": "credit", "run_id": "other-run", "n": 5}))
        .await;
    assert!(c.recv(Duration::from_millis(300)).await.is_none());

    // Two credits, two batches, then silence.
    c.send(credit(2)).await;
    let (h0, f0) = c.recv(Duration::from_secs(10)).await.unwrap();
    let (h1, f1) = c.recv(Duration::from_secs(10)).await.unwrap();
    assert_eq!((check_batch(&h0, &f0).0, check_batch(&h1, &f1).0), (0, 1));
    assert!(c.recv(Duration::from_millis(300)).await.is_none());

    // Unacknowledged, at most max_in_flight (4) are out, whatever the credits.
    c.send(credit(10)).await;
    let mut seqs = vec![0, 1];
    while let Some((h, f)) = c.recv(Duration::from_millis(1500)).await {
        seqs.push(check_batch(&h, &f).0);
    }
    assert_eq!(seqs, vec![0, 1, 2, 3]);
    // Acknowledging frees the window; the 8 remaining credits bring batches 4.. .
    c.send(ack(&seqs)).await;
    let (h, f) = c.recv(Duration::from_secs(10)).await.unwrap();
    assert_eq!(check_batch(&h, &f).0, 4);
    c.send(ack(&[4])).await;

    // Heartbeats are answered.
    c.send(json!({"rho": 1, "kind": "heartbeat", "run_id": "it", "role": "trainer", "at_ms": 1}))
        .await;
    let mut beat = false;
    let mut rest = Vec::new();
    while let Some((h, f)) = c.recv(Duration::from_millis(1500)).await {
        match h["kind"].as_str().unwrap() {
            "heartbeat" => beat = h["role"] == "loader",
            "batch" => rest.push(check_batch(&h, &f).0),
            k => panic!("unexpected {k}"),
        }
    }
    assert!(beat, "no heartbeat reply");
    c.send(ack(&rest)).await;
    let (tail, total) = drain(&mut c, 0).await;
    let mut all: Vec<u64> = (0..5).chain(rest).chain(tail.iter().map(|t| t.0)).collect();
    all.sort();
    assert_eq!(
        all,
        (0..total).collect::<Vec<_>>(),
        "every batch exactly once"
    );

    let r = report(child);
    assert_eq!(r["total"], total);
    assert_eq!(r["counts"]["batches_acked"], total);
    assert_eq!(r["counts"]["messages_rejected"], 3);
    assert!(r["counts"]["tokens"].as_u64().unwrap() > 1000);
    let metrics = std::fs::read_to_string(run.root.join("a.metrics.jsonl")).unwrap();
    let last: Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(last["batches_acked"], total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_by_flag_and_by_message_gives_the_same_batches() {
    let run = setup();
    let cfg = write_config(&run.root, "full", json!({"state_dir": "state"}));
    let (child, endpoint) = start(&run.root, "full", &cfg);
    let mut c = Client::connect(&endpoint).await;
    let (full, total) = drain(&mut c, 3).await;
    report(child);
    assert!(total > 8);
    assert_eq!(
        full.iter().map(|b| b.0).collect::<Vec<_>>(),
        (0..total).collect::<Vec<_>>()
    );

    // `--start-batch` on the command line.
    let cfg = write_config(&run.root, "flag", json!({"state_dir": "state"}));
    let mut child = Command::new(RHO)
        .args(["loader", "--start-batch", "5", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let file = run.root.join("flag.endpoint");
    while !file.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("loader exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = Client::connect(&std::fs::read_to_string(&file).unwrap()).await;
    let (resumed, t) = drain(&mut c, 2).await;
    report(child);
    assert_eq!(t, total);
    assert!(
        resumed[..] == full[5..],
        "--start-batch 5 differs from the full run"
    );

    // A `resume` message before any credit.
    let cfg = write_config(&run.root, "msg", json!({}));
    let (child, endpoint) = start(&run.root, "msg", &cfg);
    let mut c = Client::connect(&endpoint).await;
    c.send(json!({"rho": 1, "kind": "resume", "run_id": "it", "next_seq": 7}))
        .await;
    let (resumed, _) = drain(&mut c, 2).await;
    report(child);
    assert!(
        resumed[..] == full[7..],
        "resume message at 7 differs from the full run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_naming_its_rank_splits_the_stream_from_its_global_cursor() {
    // Two ranks trained the global batches 0..4; three ranks resume at the global cursor 4,
    // each with its own cursor `4 + rank`: rank r gets 4 + r, 7 + r, ..., each rank the same
    // count, and the batches are the single stream's.
    let run = setup();
    let cfg = write_config(&run.root, "whole", json!({}));
    let (child, endpoint) = start(&run.root, "whole", &cfg);
    let (full, total) = drain(&mut Client::connect(&endpoint).await, 3).await;
    report(child);
    let (cursor, world) = (4u64, 3u32);
    let n = (total - cursor) / u64::from(world);
    assert!(n >= 2, "{total} batches");
    let cfg = write_config(&run.root, "three", json!({"world": world}));
    let (child, endpoint) = start(&run.root, "three", &cfg);
    let mut ranks = Vec::new();
    for r in 0..world {
        let endpoint = endpoint.clone();
        ranks.push(tokio::spawn(async move {
            let mut c = Client::connect(&endpoint).await;
            let next_seq = cursor + u64::from(r);
            c.send(json!({"rho": 1, "kind": "resume", "run_id": "it", "next_seq": next_seq, "rank": r, "world": world}))
                .await;
            drain_rank(&mut c, 2, Some((r, world))).await
        }));
    }
    for (r, task) in ranks.into_iter().enumerate() {
        let (got, end) = task.await.unwrap();
        assert_eq!(end, cursor + n * u64::from(world), "rank {r}: the end");
        let seqs: Vec<u64> = got.iter().map(|b| b.0).collect();
        let want: Vec<u64> = (0..n)
            .map(|k| cursor + r as u64 + k * u64::from(world))
            .collect();
        assert_eq!(seqs, want, "rank {r}");
        for (seq, ids) in &got {
            assert!(*ids == full[*seq as usize].1, "rank {r}: batch {seq}");
        }
    }
    report(child);

    // A resume of another world, or a cursor below its rank, is refused with the reason.
    let cfg = write_config(&run.root, "refuse", json!({"world": world}));
    let (mut child, endpoint) = start(&run.root, "refuse", &cfg);
    for (resume, needle) in [
        (json!({"next_seq": 5, "rank": 1, "world": 2}), "world"),
        (
            json!({"next_seq": 1, "rank": 2, "world": 3}),
            "at least its rank",
        ),
    ] {
        let mut c = Client::connect(&endpoint).await;
        let mut m = json!({"rho": 1, "kind": "resume", "run_id": "it"});
        for (k, v) in resume.as_object().unwrap() {
            m[k] = v.clone();
        }
        c.send(m).await;
        let (h, _) = c.recv(Duration::from_secs(10)).await.expect("an answer");
        assert_eq!(h["kind"], "shutdown");
        let reason = h["reason"].as_str().unwrap();
        assert!(reason.contains(needle), "{reason} should say {needle}");
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_bad_config_names_the_field_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.json");
    std::fs::write(&path, r#"{"data": {"paths": ["x"]}, "tokenizer": "t.json", "seq_len": 8, "batch_size": 2, "suffle_window": 3}"#).unwrap();
    let out = Command::new(RHO)
        .args(["loader", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("suffle_window") && err.contains("bad.json"),
        "{err}"
    );

    std::fs::write(&path, r#"{"data": {"paths": ["x"]}, "tokenizer": "t.json", "seq_len": 8, "batch_size": 2, "world": 2, "rank": 2}"#).unwrap();
    let out = Command::new(RHO)
        .args(["loader", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("`rank`"));
}

/// Rule: a selector silent for `selector_timeout_secs` loses what it holds at once: a hung
/// selector (connected, saying nothing more) that took two batches, and another consumer gets
/// those two within seconds, long before their leases (300 s) run out; a consumer that never
/// said it is a selector keeps its batches until the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_selectors_batches_go_to_the_others_before_their_leases() {
    let run = setup();
    let cfg = write_config(&run.root, "s", json!({"selector_timeout_secs": 1.0}));
    let (mut child, endpoint) = start(&run.root, "s", &cfg);
    let beat = |role: &str| json!({"rho": 1, "kind": "heartbeat", "run_id": "it", "role": role, "at_ms": 1});
    let mut hung = Client::connect(&endpoint).await;
    hung.send(beat("selector")).await;
    hung.send(credit(2)).await;
    let mut taken = Vec::new();
    while taken.len() < 2 {
        let (h, f) = hung.recv(Duration::from_secs(10)).await.unwrap();
        if h["kind"] == "batch" {
            taken.push(check_batch(&h, &f).0);
        }
    }
    // A trainer-like consumer that takes one batch and then falls silent too: not a selector.
    let mut quiet = Client::connect(&endpoint).await;
    quiet.send(beat("trainer")).await;
    quiet.send(credit(1)).await;
    let (h, f) = loop {
        let (h, f) = quiet.recv(Duration::from_secs(10)).await.unwrap();
        if h["kind"] == "batch" {
            break (h, f);
        }
    };
    let kept = check_batch(&h, &f).0;
    // The hung selector says nothing more; another consumer asks for work.
    let started = std::time::Instant::now();
    let mut other = Client::connect(&endpoint).await;
    other.send(credit(8)).await;
    let mut got = Vec::new();
    while let Some((h, f)) = other.recv(Duration::from_secs(6)).await {
        if h["kind"] == "batch" {
            got.push(check_batch(&h, &f).0);
        }
    }
    for seq in &taken {
        assert!(
            got.contains(seq),
            "batch {seq} of the silent selector: {got:?}"
        );
    }
    assert!(
        !got.contains(&kept),
        "the trainer's batch {kept} was handed out again before its lease"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    let _ = child.kill();
    let _ = child.wait();
}
