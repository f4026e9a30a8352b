//! Real `rho loader` + two `rho selector` processes + a test trainer: every batch arrives scored
//! exactly once, with the losses the model computes in-process. Bad pairings are refused.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use rho_protocol::client::Consumer;
use rho_protocol::{Credit, Limits, Message};
use serde_json::json;
use zeromq::{RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

mod common;

use common::{rho, RHO};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Corpus, tokenizer and a tiny reference model.
fn setup(root: &Path) {
    rho(&[
        "synth",
        "--shards",
        "2",
        "--docs-per-shard",
        "40",
        "--out",
        p(&root.join("data")),
    ]);
    rho(&[
        "tokenizer",
        "train",
        "--vocab-size",
        "500",
        "--input",
        p(&root.join("data")),
        "--out",
        p(&root.join("tokenizer.json")),
    ]);
    rho(&[
        "model",
        "init",
        "--preset",
        "tiny",
        "--tokenizer",
        p(&root.join("tokenizer.json")),
        "--out",
        p(&root.join("ref")),
    ]);
}

/// A `rho loader` on the corpus, with `extra` fields over the defaults of these tests.
fn start_loader(root: &Path, extra: serde_json::Value) -> (Child, String) {
    let mut cfg = json!({
        "run_id": "sel", "data": {"paths": ["data"]}, "tokenizer": "tokenizer.json",
        "seq_len": 48, "batch_size": 3, "endpoint": "tcp://127.0.0.1:0",
        "endpoint_file": "loader.endpoint", "max_in_flight": 6,
    });
    for (k, v) in extra.as_object().expect("an object") {
        cfg[k] = v.clone();
    }
    std::fs::write(root.join("loader.json"), cfg.to_string()).unwrap();
    let child = Command::new(RHO)
        .args(["loader", "--config", p(&root.join("loader.json"))])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let file = root.join("loader.endpoint");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !file.exists() {
        assert!(Instant::now() < deadline, "loader never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, std::fs::read_to_string(file).unwrap())
}

fn selector_config(
    root: &Path,
    name: &str,
    loader: &str,
    trainer: &str,
    model: &str,
    tokenizer: &str,
    dtype: &str,
) -> PathBuf {
    let cfg = json!({
        "run_id": "sel", "loader": loader, "trainer": trainer, "model": model,
        "tokenizer": tokenizer, "prefetch": 2, "metrics": format!("{name}.metrics.jsonl"),
        "dtype": dtype,
    });
    let path = root.join(format!("{name}.json"));
    std::fs::write(&path, cfg.to_string()).unwrap();
    path
}

fn start_selector(config: &Path) -> Child {
    Command::new(RHO)
        .args(["selector", "--config", p(config)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The batches the loader served, from its report once it has exited (at least six).
fn loader_total(loader: Child) -> u64 {
    let out = loader.wait_with_output().unwrap();
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let total = report["total"].as_u64().unwrap();
    assert!(total >= 6, "only {total} batches");
    total
}

fn credit(peer: &Bytes, n: u32) -> ZmqMessage {
    let mut frames = vec![peer.clone()];
    frames.extend(
        Message::Credit(Credit {
            run_id: "sel".into(),
            n,
            rank: None,
        })
        .encode(),
    );
    ZmqMessage::try_from(frames).unwrap()
}

/// The test trainer: binds the delivery endpoint, grants credits, acknowledges to the loader.
struct TestTrainer {
    router: RouterSocket,
    endpoint: String,
    acker: Consumer,
    deadline: Instant,
}

impl TestTrainer {
    async fn new(loader: &str) -> Self {
        let mut router = RouterSocket::new();
        let endpoint = router.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
        let acker = Consumer::connect(loader, "sel", Limits::default())
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        TestTrainer {
            router,
            endpoint,
            acker,
            deadline,
        }
    }

    /// The next message and its sender; `None` after 5 quiet seconds (the stream is done).
    async fn next(&mut self) -> Option<(Bytes, Message)> {
        let m = tokio::time::timeout(Duration::from_secs(5), self.router.recv())
            .await
            .ok()?
            .unwrap();
        assert!(
            Instant::now() < self.deadline,
            "the selectors took too long"
        );
        let mut frames = m.into_vec();
        let peer = frames.remove(0);
        Some((peer, Message::decode(&frames, &Limits::default()).unwrap()))
    }

    /// Acknowledges batch `seq` to the loader and gives `peer` its credit back.
    async fn done(&mut self, peer: &Bytes, seq: u64) {
        self.acker.ack(vec![seq]).await.unwrap();
        self.router.send(credit(peer, 1)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_selectors_score_every_batch_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    let (loader, loader_ep) = start_loader(root, json!({}));
    let mut trainer = TestTrainer::new(&loader_ep).await;
    let trainer_ep = trainer.endpoint.clone();
    let model_dir = root.join("ref");
    let mut selectors = Vec::new();
    // One selector runs its model in half precision on the CPU; its losses still travel as f32.
    for (name, dtype) in [("s1", "f32"), ("s2", "f16")] {
        let cfg = selector_config(
            root,
            name,
            &loader_ep,
            &trainer_ep,
            p(&model_dir),
            p(&root.join("tokenizer.json")),
            dtype,
        );
        selectors.push(start_selector(&cfg));
    }
    let models: Vec<_> = [DType::F32, DType::F16]
        .into_iter()
        .map(|d| {
            (
                d,
                rho_model::checkpoint::load(&model_dir, &Device::Cpu, d).unwrap(),
            )
        })
        .collect();
    let fingerprint = rho_selector::scorer::model_fingerprint(&model_dir).unwrap();

    let mut seen = std::collections::BTreeMap::new();
    let mut dtype_of_peer = std::collections::BTreeMap::new();
    let mut peers = std::collections::BTreeSet::new();
    while let Some((peer, m)) = trainer.next().await {
        match m {
            Message::Heartbeat(_) => trainer.router.send(credit(&peer, 2)).await.unwrap(),
            Message::Scored(s) => {
                assert_eq!(s.ref_model, fingerprint);
                let b = &s.batch;
                let ids = Tensor::from_slice(&b.tokens, (b.rows, b.window), &Device::Cpu).unwrap();
                let t = b.window - 1;
                // The losses are those of the model in one of the two dtypes (the f16 ones
                // differ from the f32 ones; the nearer is checked below, position by position),
                // and a selector always uses the same one.
                let valid = |r: usize| b.lengths[r] as usize - 1;
                let (dtype, expect) = models
                    .iter()
                    .map(|(d, m)| {
                        let l =
                            rho_model::per_token_loss(m, &ids, rho_model::ForwardMode::Fused, None)
                                .unwrap();
                        (*d, l.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                    })
                    .min_by(|(_, x), (_, y)| {
                        let worst = |l: &[f32]| {
                            (0..b.rows)
                                .flat_map(|r| (0..valid(r)).map(move |i| r * t + i))
                                .map(|k| (s.ref_loss[k] - l[k]).abs())
                                .fold(0f32, f32::max)
                        };
                        worst(x).total_cmp(&worst(y))
                    })
                    .unwrap();
                assert_eq!(*dtype_of_peer.entry(peer.clone()).or_insert(dtype), dtype);
                for r in 0..b.rows {
                    let valid = b.lengths[r] as usize - 1;
                    for i in 0..t {
                        let (g, e) = (s.ref_loss[r * t + i], expect[r * t + i]);
                        if i < valid {
                            assert!(
                                (g - e).abs() < 1e-5,
                                "batch {} row {r} pos {i}: {g} vs {e}",
                                b.seq
                            );
                        } else {
                            assert_eq!(g, 0.0, "padding must score 0");
                        }
                    }
                }
                assert!(
                    seen.insert(b.seq, peer.clone()).is_none(),
                    "batch {} delivered twice",
                    b.seq
                );
                peers.insert(peer.clone());
                trainer.done(&peer, b.seq).await;
            }
            other => panic!("unexpected {}", other.kind()),
        }
    }
    let total = loader_total(loader);
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (0..total).collect::<Vec<_>>()
    );
    assert_eq!(peers.len(), 2, "both selectors took work");
    let dtypes: std::collections::BTreeSet<_> =
        dtype_of_peer.values().map(|d| d.as_str()).collect();
    assert_eq!(dtypes.len(), 2, "one f32 and one f16 selector: {dtypes:?}");
    for s in selectors {
        let out = s.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(r["batches"].as_u64().unwrap() > 0);
        assert!(r["tokens"].as_u64().unwrap() > 0);
    }
    let metrics = std::fs::read_to_string(root.join("s1.metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert!(last["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(last.get("mean_latency_ms").is_some() && last.get("mean_queue_wait_ms").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_vocabulary_and_tokenizer_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    // A reference model whose vocabulary is smaller than the tokenizer's.
    rho(&[
        "model",
        "init",
        "--preset",
        "tiny",
        "--vocab-size",
        "100",
        "--out",
        p(&root.join("small")),
    ]);
    let cfg = selector_config(
        root,
        "v",
        "tcp://127.0.0.1:1",
        "tcp://127.0.0.1:1",
        p(&root.join("small")),
        p(&root.join("tokenizer.json")),
        "f32",
    );
    let out = Command::new(RHO)
        .args(["selector", "--config", p(&cfg)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("small") && err.contains("tokenizer.json") && err.contains("100"),
        "{err}"
    );

    // A selector configured with another tokenizer than the loader's.
    rho(&[
        "tokenizer",
        "train",
        "--vocab-size",
        "450",
        "--input",
        p(&root.join("data")),
        "--out",
        p(&root.join("other.json")),
    ]);
    let (mut loader, loader_ep) = start_loader(root, json!({}));
    let mut router = RouterSocket::new();
    let trainer_ep = router.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
    let cfg = selector_config(
        root,
        "t",
        &loader_ep,
        &trainer_ep,
        p(&root.join("ref")),
        p(&root.join("other.json")),
        "f32",
    );
    let selector = start_selector(&cfg);
    let m = router.recv().await.unwrap();
    let peer = m.into_vec().remove(0);
    router.send(credit(&peer, 1)).await.unwrap();
    let out = selector.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("other.json") && err.contains("sha256:"),
        "{err}"
    );
    let _ = loader.kill();
}

/// Two lanes score two batches at once, each on one thread: the batches are delivered in the
/// order they arrived, every one exactly once, with the bits of the model's losses computed
/// in this process on every core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_deliver_in_order_with_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    let (loader, loader_ep) = start_loader(root, json!({}));
    let mut trainer = TestTrainer::new(&loader_ep).await;
    let model_dir = root.join("ref");
    let cfg = json!({
        "run_id": "sel", "loader": loader_ep, "trainer": trainer.endpoint, "model": p(&model_dir),
        "tokenizer": p(&root.join("tokenizer.json")), "lanes": 2, "threads": 2,
    });
    let path = root.join("lanes.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let selector = start_selector(&path);
    let model = rho_model::checkpoint::load(&model_dir, &Device::Cpu, DType::F32).unwrap();

    let mut order = Vec::new();
    while let Some((peer, m)) = trainer.next().await {
        match m {
            // Credits for four: both lanes busy, two more batches queued behind them.
            Message::Heartbeat(_) if order.is_empty() => {
                trainer.router.send(credit(&peer, 4)).await.unwrap()
            }
            Message::Heartbeat(_) => {}
            Message::Scored(s) => {
                let b = &s.batch;
                let ids = Tensor::from_slice(&b.tokens, (b.rows, b.window), &Device::Cpu).unwrap();
                let want =
                    rho_model::per_token_loss(&model, &ids, rho_model::ForwardMode::Fused, None)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                let t = b.window - 1;
                for r in 0..b.rows {
                    let valid = b.lengths[r] as usize - 1;
                    for i in 0..valid {
                        let (g, e) = (s.ref_loss[r * t + i], want[r * t + i]);
                        assert_eq!(
                            g.to_bits(),
                            e.to_bits(),
                            "batch {} row {r} pos {i}: {g} vs {e}",
                            b.seq
                        );
                    }
                }
                order.push(b.seq);
                trainer.done(&peer, b.seq).await;
            }
            other => panic!("unexpected {}", other.kind()),
        }
    }
    let total = loader_total(loader);
    assert_eq!(
        order,
        (0..total).collect::<Vec<_>>(),
        "delivered in arrival order, once each"
    );
    let out = selector.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["lanes"], 2);
    assert_eq!(r["batches"].as_u64(), Some(total));
}

/// One loader of every rank (`world` 2, `rank` unset) and two selectors that each serve both
/// ranks: rank `r`'s trainer receives exactly the batches `seq % 2 == r`, each once, both ranks
/// the same number; a rank that grants nothing for a while holds back no more than its own
/// window, the other rank goes on receiving meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors_serve_every_rank_of_one_loader() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    let (loader, loader_ep) = start_loader(root, json!({"max_in_flight": 4, "world": 2}));
    let mut ranks = [
        TestTrainer::new(&loader_ep).await,
        TestTrainer::new(&loader_ep).await,
    ];
    let trainers: Vec<String> = ranks.iter().map(|t| t.endpoint.clone()).collect();
    let mut selectors = Vec::new();
    for name in ["a", "b"] {
        let cfg = json!({
            "run_id": "sel", "loader": loader_ep, "trainers": trainers,
            "model": p(&root.join("ref")), "tokenizer": p(&root.join("tokenizer.json")),
            "prefetch": 2, "lanes": 1,
        });
        let path = root.join(format!("{name}.json"));
        std::fs::write(&path, cfg.to_string()).unwrap();
        selectors.push(start_selector(&path));
    }
    let mut seen: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    let mut known: [Vec<Bytes>; 2] = [Vec::new(), Vec::new()];
    // Rank 1 grants nothing until rank 0 has received 4 batches; then each selector gets 2.
    let mut rank1_before = None;
    loop {
        let [t0, t1] = &mut ranks;
        let (r, m) = tokio::select! {
            m = t0.router.recv() => (0, m.unwrap()),
            m = t1.router.recv() => (1, m.unwrap()),
            _ = tokio::time::sleep(Duration::from_secs(8)) => break,
        };
        let mut frames = m.into_vec();
        let peer = frames.remove(0);
        assert!(
            Instant::now() < ranks[r].deadline,
            "the selectors took too long"
        );
        match Message::decode(&frames, &Limits::default()).unwrap() {
            Message::Heartbeat(_) if !known[r].contains(&peer) => {
                known[r].push(peer.clone());
                if r == 0 || rank1_before.is_some() {
                    ranks[r].router.send(credit(&peer, 2)).await.unwrap();
                }
            }
            Message::Heartbeat(_) => {}
            Message::Scored(s) => {
                let seq = s.batch.seq;
                assert_eq!(seq % 2, r as u64, "batch {seq} went to rank {r}");
                assert!(!seen[r].contains(&seq), "batch {seq} delivered twice");
                seen[r].push(seq);
                ranks[r].done(&peer, seq).await;
            }
            other => panic!("unexpected {}", other.kind()),
        }
        if rank1_before.is_none() && seen[0].len() >= 4 {
            rank1_before = Some(seen[1].len());
            for peer in &known[1] {
                ranks[1].router.send(credit(peer, 2)).await.unwrap();
            }
        }
    }
    assert_eq!(
        rank1_before,
        Some(0),
        "rank 0 went on while rank 1 held back"
    );
    let total = loader_total(loader);
    assert_eq!(total % 2, 0, "every rank gets the same number of batches");
    for (r, got) in seen.iter_mut().enumerate() {
        got.sort();
        let want: Vec<u64> = (0..total).filter(|s| s % 2 == r as u64).collect();
        assert_eq!(*got, want, "rank {r}");
    }
    let mut per_rank = [0u64; 2];
    for s in selectors {
        let out = s.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for (i, n) in r["batches_per_rank"].as_array().unwrap().iter().enumerate() {
            per_rank[i] += n.as_u64().unwrap();
        }
    }
    assert_eq!(per_rank, [total / 2, total / 2]);
}
