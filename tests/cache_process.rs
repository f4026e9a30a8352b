//! Score once, train many times: a selector writes the scored batches of a live SLM run to a
//! cache (`--cache-out`); `rho loader --scored` serves that cache to a trainer with no selector,
//! which ends with the same weights as the live run. A cache of another tokenizer, and a damaged
//! one, are refused with the file named.

mod common;

use std::path::Path;

use common::{finish, free_port, p, setup_training, spawn, write};
use serde_json::{json, Value};

fn trainer_config(root: &Path, name: &str, loader: &str, source: &str) -> std::path::PathBuf {
    let cfg = json!({
        "run_id": "tr", "loader": loader, "delivery": format!("tcp://127.0.0.1:{}", free_port()),
        "model": "init", "source": source,
        "selection": {"score": "excess", "schedule": {"kind": "constant", "ratio": 0.6}},
        "optimizer": {"lr": 0.003, "warmup_steps": 3},
        "checkpoint": {"dir": format!("{name}-checkpoints")},
    });
    let path = root.join(format!("{name}-trainer.json"));
    write(&path, &cfg);
    path
}

fn weights(root: &Path, name: &str) -> Vec<u8> {
    let dir = root.join(format!("{name}-checkpoints"));
    let latest = std::fs::read_to_string(dir.join("latest")).unwrap();
    std::fs::read(dir.join(latest.trim()).join("model/model.safetensors")).unwrap()
}

fn loader_config(root: &Path) -> (String, std::path::PathBuf) {
    let ep = format!("tcp://127.0.0.1:{}", free_port());
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("loader.json")).unwrap()).unwrap();
    cfg["endpoint"] = json!(ep);
    cfg["endpoint_file"] = Value::Null;
    let path = root.join(format!("loader-{}.json", ep.rsplit(':').next().unwrap()));
    write(&path, &cfg);
    (ep, path)
}

/// `rho loader --scored cache`.
fn serve_cache(root: &Path, config: &Path) -> std::process::Child {
    spawn(&[
        "loader",
        "--config",
        &p(config),
        "--scored",
        &p(&root.join("cache")),
    ])
}

/// Runs `rho loader` on a config it must refuse; returns what it said.
fn refused(config: &Path) -> String {
    let out = std::process::Command::new(common::RHO)
        .args(["loader", "--config", &p(config)])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the loader accepted {}",
        config.display()
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn training_from_the_cache_equals_training_live() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup_training(root);

    // Live: loader, a selector that also writes the cache, trainer.
    let (ep, loader_cfg) = loader_config(root);
    let trainer_cfg = trainer_config(root, "live", &ep, "selectors");
    let loader = spawn(&["loader", "--config", &p(&loader_cfg)]);
    let delivery: Value =
        serde_json::from_str(&std::fs::read_to_string(&trainer_cfg).unwrap()).unwrap();
    let sel = json!({"run_id": "tr", "loader": ep, "trainer": delivery["delivery"], "model": "ref", "tokenizer": "tokenizer.json"});
    write(&root.join("selector.json"), &sel);
    let trainer = spawn(&["trainer", "--config", &p(&trainer_cfg)]);
    let selector = spawn(&[
        "selector",
        "--config",
        &p(&root.join("selector.json")),
        "--cache-out",
        &p(&root.join("cache")),
    ]);
    let live = finish(trainer, "live trainer");
    finish(loader, "loader");
    let sel_report = finish(selector, "selector");
    assert!(sel_report["cache_bytes"].as_u64().unwrap() > 0);

    // From the cache: no selector at all.
    let (ep, loader_cfg) = loader_config(root);
    let trainer_cfg = trainer_config(root, "cached", &ep, "loader");
    let loader = serve_cache(root, &loader_cfg);
    let trainer = spawn(&["trainer", "--config", &p(&trainer_cfg)]);
    let cached = finish(trainer, "trainer fed by the cache");
    finish(loader, "loader serving the cache");
    assert_eq!(live["steps"], cached["steps"]);
    assert_eq!(live["consumed"], cached["consumed"]);
    assert!(
        weights(root, "live") == weights(root, "cached"),
        "training from the cache ended with other weights"
    );

    // The same cache served to two ranks by one loader (`world` 2, `rank` unset): each rank
    // gets exactly its batches of the stream trained above, the two the same number.
    let (ep, two_cfg) = loader_config(root);
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&two_cfg).unwrap()).unwrap();
    cfg["world"] = json!(2);
    write(&two_cfg, &cfg);
    let loader = serve_cache(root, &two_cfg);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let ranks: Vec<Vec<u64>> = runtime.block_on(async {
        let tasks: Vec<_> = (0..2u32)
            .map(|r| tokio::spawn(drain_rank(ep.clone(), r, 2)))
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let served = finish(loader, "loader serving the cache to two ranks");
    let total = served["total"].as_u64().unwrap();
    assert!(
        total >= 2 && total.is_multiple_of(2),
        "{total} batches for two ranks"
    );
    for (r, got) in ranks.iter().enumerate() {
        let want: Vec<u64> = (0..total).filter(|s| s % 2 == r as u64).collect();
        assert_eq!(got, &want, "rank {r} of the cache");
    }

    // Another tokenizer: refused, both fingerprints named.
    let (_, other_cfg) = loader_config(root);
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&other_cfg).unwrap()).unwrap();
    common::rho(&[
        "tokenizer",
        "train",
        "--vocab-size",
        "350",
        "--input",
        &p(&root.join("train")),
        "--out",
        &p(&root.join("other-tokenizer.json")),
    ]);
    cfg["tokenizer"] = json!("other-tokenizer.json");
    cfg["scored"] = json!("cache");
    write(&other_cfg, &cfg);
    let err = refused(&other_cfg);
    assert!(err.contains("was made with tokenizer"), "{err}");

    // Another reference model than the one named: refused.
    cfg["tokenizer"] = json!("tokenizer.json");
    cfg["scored_ref_model"] = json!(format!("sha256:{}", "0".repeat(64)));
    write(&other_cfg, &cfg);
    let err = refused(&other_cfg);
    assert!(err.contains("was scored by reference"), "{err}");

    // A flipped byte in a part file: the loader stops, naming the file.
    let part = std::fs::read_dir(root.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "rsc"))
        .unwrap();
    let mut bytes = std::fs::read(&part).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x10;
    std::fs::write(&part, &bytes).unwrap();
    let (ep, loader_cfg) = loader_config(root);
    let trainer_cfg = trainer_config(root, "damaged", &ep, "loader");
    let loader = serve_cache(root, &loader_cfg);
    let mut trainer = spawn(&["trainer", "--config", &p(&trainer_cfg)]);
    let out = loader.wait_with_output().unwrap();
    let _ = trainer.kill();
    let _ = trainer.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(part.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
}

/// Drains rank `rank` of `world` from a loader of every rank: its sequence numbers, in order.
async fn drain_rank(endpoint: String, rank: u32, world: u32) -> Vec<u64> {
    use rho_protocol::client::Consumer;
    use rho_protocol::{Limits, Message, Rank};
    let mut c = Consumer::connect(&endpoint, "tr", Limits::default())
        .await
        .unwrap();
    c.credit_for(4, Rank::new(rank, world)).await.unwrap();
    let mut seqs = Vec::new();
    loop {
        let m = tokio::time::timeout(std::time::Duration::from_secs(60), c.recv())
            .await
            .expect("the cache's stream stalled")
            .unwrap();
        match m {
            Message::Scored(s) => {
                assert_eq!(s.batch.seq % u64::from(world), u64::from(rank));
                seqs.push(s.batch.seq);
                c.ack(vec![s.batch.seq]).await.unwrap();
                c.credit_for(1, Rank::new(rank, world)).await.unwrap();
            }
            Message::End(_) => return seqs,
            Message::Heartbeat(_) => {}
            other => panic!("rank {rank}: unexpected `{}`", other.kind()),
        }
    }
}

/// `rho bench fanout` fails when a batch reaches a rank it does not belong to, or when the ranks
/// do not receive exactly the loader's stream: through the selectors to three ranks, and from the
/// scored cache it writes to one and three ranks, every row is measured.
#[test]
fn the_fanout_benchmark_delivers_the_stream_to_its_ranks_live_and_from_a_cache() {
    let dir = tempfile::tempdir().unwrap();
    let out = p(&dir.path().join("fanout"));
    for extra in [&["--ranks", "3"][..], &["--ranks", "1,3", "--cache"][..]] {
        let mut args = vec!["bench", "fanout", "--out", &out, "--epochs", "1"];
        args.extend(["--seq-len", "128", "--batch-size", "2"]);
        args.extend(extra);
        let run = std::process::Command::new(common::RHO)
            .args(&args)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success(),
            "{args:?}: {said}{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let rows: Vec<&str> = said
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| ranks"))
            .collect();
        assert_eq!(rows.len(), extra[1].split(',').count(), "{said}");
        let source = if extra.len() == 3 {
            "| none (cache) |"
        } else {
            "| 2 |"
        };
        assert!(rows.iter().all(|r| r.contains(source)), "{said}");
    }
}
