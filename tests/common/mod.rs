//! Helpers shared by the multi-process tests.
#![allow(dead_code)]

use std::path::Path;

use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const RHO: &str = env!("CARGO_BIN_EXE_rho");

/// Runs `rho ARGS` to completion and fails the test, with its stderr, if it fails.
pub fn rho(args: &[&str]) {
    let out = Command::new(RHO).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "rho {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `rho ARGS` with stdout and stderr captured.
pub fn spawn(args: &[&str]) -> Child {
    Command::new(RHO)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

pub fn p(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

/// Waits (up to a minute) for a file a process writes once it listens, and returns its text.
pub fn wait_file(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::read_to_string(path).unwrap()
}

/// The step of the last line of `run_dir/trainer.metrics.jsonl` (0 before the first).
pub fn last_step(run_dir: &Path) -> u64 {
    std::fs::read_to_string(run_dir.join("trainer.metrics.jsonl"))
        .ok()
        .and_then(|t| {
            t.lines()
                .last()
                .and_then(|l| serde_json::from_str::<Value>(l).ok())
        })
        .and_then(|v| v["step"].as_u64())
        .unwrap_or(0)
}

/// Waits for a process and parses the JSON report it prints on success.
pub fn finish(child: Child, what: &str) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what} report: {e}"))
}

/// `rho synth`: `shards` shards of `docs` documents each, from `seed`, into `root/out`.
pub fn synth(root: &Path, out: &str, shards: u32, docs: u32, seed: u64) {
    rho(&[
        "synth",
        "--shards",
        &shards.to_string(),
        "--docs-per-shard",
        &docs.to_string(),
        "--seed",
        &seed.to_string(),
        "--out",
        &p(&root.join(out)),
    ]);
}

/// `rho tokenizer train` on `root/data`, into `root/tokenizer.json`.
pub fn train_tokenizer(root: &Path, data: &str, vocab: usize) {
    let vocab = vocab.to_string();
    rho(&[
        "tokenizer",
        "train",
        "--vocab-size",
        &vocab,
        "--input",
        &p(&root.join(data)),
        "--out",
        &p(&root.join("tokenizer.json")),
    ]);
}

/// `rho model init` of a preset for `root/tokenizer.json`, into `root/name`.
pub fn init_model(root: &Path, preset: &str, seed: u64, name: &str) {
    let seed = seed.to_string();
    rho(&[
        "model",
        "init",
        "--preset",
        preset,
        "--seed",
        &seed,
        "--tokenizer",
        &p(&root.join("tokenizer.json")),
        "--out",
        &p(&root.join(name)),
    ]);
}

pub fn write(path: &Path, v: &Value) {
    std::fs::write(path, v.to_string()).unwrap();
}

/// Train and held-out corpora, a tokenizer, a reference (`ref`) and an initial model
/// (`init`); loader configs `loader.json` (endpoint file `loader.endpoint`) and `heldout.json`.
pub fn setup_training(root: &Path) {
    rho(&[
        "synth",
        "--shards",
        "2",
        "--docs-per-shard",
        "120",
        "--seed",
        "1",
        "--out",
        &p(&root.join("train")),
    ]);
    rho(&[
        "synth",
        "--shards",
        "1",
        "--docs-per-shard",
        "40",
        "--seed",
        "2",
        "--noise",
        "0",
        "--out",
        &p(&root.join("heldout")),
    ]);
    train_tokenizer(root, "train", 400);
    init_model(root, "tiny", 1, "ref");
    init_model(root, "tiny", 2, "init");
    let loader = |data: &str, endpoint_file: Option<&str>| {
        json!({
            "run_id": "tr", "data": {"paths": [data]}, "tokenizer": "tokenizer.json",
            "seq_len": 64, "batch_size": 4, "endpoint": "tcp://127.0.0.1:0",
            "endpoint_file": endpoint_file, "max_in_flight": 8, "shuffle_window": 8,
        })
    };
    write(
        &root.join("loader.json"),
        &loader("train", Some("loader.endpoint")),
    );
    write(&root.join("heldout.json"), &loader("heldout", None));
}

/// A TCP port free at the time of asking.
/// Waits (up to a minute) until something accepts TCP connections on `port` of loopback.
pub fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (up to a minute) until process `pid` is stopped (SIGSTOP took effect), from `/proc`.
pub fn wait_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the command name, which is in parentheses.
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next());
        if matches!(state, Some("T") | Some("t")) {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The sequence numbers a trainer report says were trained on, in order.
pub fn consumed(report: &Value) -> Vec<u64> {
    report["consumed"]
        .as_array()
        .expect("`consumed` in the trainer report")
        .iter()
        .map(|v| v.as_u64().expect("a sequence number"))
        .collect()
}

/// A checkpoint's `model/` directory loads as a HuggingFace model (f32, on the CPU).
pub fn assert_model_loads(checkpoint: &Path) {
    rho_model::checkpoint::load(
        &checkpoint.join("model"),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap_or_else(|e| panic!("{}: {e}", checkpoint.display()));
}

/// The last line of a JSONL metrics file, parsed; `None` while there is none.
pub fn last_metrics(path: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(text.lines().last()?).ok()
}
