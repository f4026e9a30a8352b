//! Rule: hostile bytes never end a process. A raw TCP client speaks a valid ZMTP 3.0 greeting
//! to the loader's and the trainer's endpoints during a run, then claims frames far larger than
//! `max_message_bytes` (a command frame and a message frame of 2^62 bytes, one just past the
//! limit, a multipart message whose frames add up past it), or sends a greeting and nothing
//! else. Each such peer is dropped before anything is reserved for it; the run ends with the
//! same weights, bit for bit, as an undisturbed one.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{finish, p, setup_training as setup, spawn, wait_file, write};
use serde_json::{json, Value};

/// The limit of every process of the runs here: far above a batch, far below the claims.
const MAX: u64 = 4 << 20;

/// The 64-byte greeting of ZMTP 3.0 with the NULL mechanism, as a client.
fn greeting() -> Vec<u8> {
    let mut g = vec![0u8; 64];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[11] = 0;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// A short command frame: `READY` with `Socket-Type: DEALER`.
fn ready() -> Vec<u8> {
    let mut body = vec![5u8];
    body.extend_from_slice(b"READY");
    body.push(11);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&6u32.to_be_bytes());
    body.extend_from_slice(b"DEALER");
    let mut f = vec![0x04, body.len() as u8];
    f.extend_from_slice(&body);
    f
}

/// The header of a long frame (`command` or message, `more` to follow) claiming `len` bytes.
fn long_header(command: bool, more: bool, len: u64) -> Vec<u8> {
    let flags = 0x02 | if command { 0x04 } else { 0 } | u8::from(more);
    let mut h = vec![flags];
    h.extend_from_slice(&len.to_be_bytes());
    h
}

/// What one hostile peer sends after its greeting.
fn attacks() -> Vec<Vec<u8>> {
    let mut past_limit = ready();
    past_limit.extend(long_header(false, false, MAX + 1));
    let mut multipart = ready();
    for _ in 0..5 {
        let part = 1u64 << 20;
        multipart.extend(long_header(false, true, part));
        multipart.extend(std::iter::repeat_n(0u8, part as usize));
    }
    let mut huge_message = ready();
    huge_message.extend(long_header(false, false, 1 << 62));
    vec![
        long_header(true, false, 1 << 62),
        huge_message,
        past_limit,
        multipart,
        Vec::new(),
    ]
}

/// Connects to `endpoint` (`tcp://host:port`), sends the greeting and `bytes`, and waits (a
/// little) for the peer to drop the connection.
fn attack(endpoint: &str, bytes: &[u8]) -> std::io::Result<()> {
    let addr = endpoint.trim_start_matches("tcp://");
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    s.write_all(&greeting())?;
    s.write_all(bytes)?;
    let mut sink = [0u8; 4096];
    for _ in 0..10 {
        match s.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    Ok(())
}

/// One SLM pipeline (loader, trainer, selector) named `name`, optionally under attack; the
/// trainer's report and its final weights.
fn run(root: &Path, name: &str, hostile: bool) -> (Value, Vec<u8>, u64) {
    let mut loader_cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("loader.json")).unwrap()).unwrap();
    loader_cfg["endpoint_file"] = json!(format!("{name}.loader.endpoint"));
    loader_cfg["max_message_bytes"] = json!(MAX);
    loader_cfg["epochs"] = json!(1);
    let loader_path = root.join(format!("{name}.loader.json"));
    write(&loader_path, &loader_cfg);
    let loader = spawn(&["loader", "--config", &p(&loader_path)]);
    let loader_ep = wait_file(&root.join(format!("{name}.loader.endpoint")));
    let trainer_cfg = json!({
        "run_id": "tr", "loader": loader_ep, "delivery": "tcp://127.0.0.1:0",
        "delivery_file": format!("{name}.delivery"), "model": "init", "micro_batches": 2,
        "selection": {"score": "excess"}, "optimizer": {"lr": 0.003},
        "checkpoint": {"dir": format!("{name}-checkpoints")}, "max_message_bytes": MAX,
    });
    let trainer_path = root.join(format!("{name}.trainer.json"));
    write(&trainer_path, &trainer_cfg);
    let trainer = spawn(&["trainer", "--config", &p(&trainer_path)]);
    let delivery = wait_file(&root.join(format!("{name}.delivery")));
    let sel = json!({"run_id": "tr", "loader": loader_ep, "trainer": delivery, "model": "ref",
                     "tokenizer": "tokenizer.json", "max_message_bytes": MAX});
    let sel_path = root.join(format!("{name}.selector.json"));
    write(&sel_path, &sel);
    let selector = spawn(&["selector", "--config", &p(&sel_path)]);

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let attacker = hostile.then(|| {
        let (stop, sent) = (stop.clone(), sent.clone());
        let targets = [loader_ep.clone(), delivery.clone()];
        std::thread::spawn(move || {
            // Bounded: at most 10 rounds of every attack on both endpoints.
            for _ in 0..10 {
                for target in &targets {
                    for bytes in attacks() {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        if attack(target, &bytes).is_ok() {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        })
    });
    let report = finish(trainer, "trainer");
    stop.store(true, Ordering::Relaxed);
    if let Some(a) = attacker {
        a.join().unwrap();
    }
    finish(loader, "loader");
    finish(selector, "selector");
    let ck = Path::new(report["last_checkpoint"].as_str().unwrap()).to_path_buf();
    let weights = std::fs::read(ck.join("model/model.safetensors")).unwrap();
    (report, weights, sent.load(Ordering::Relaxed))
}

#[test]
fn oversized_frames_from_a_raw_peer_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    let (calm, calm_weights, _) = run(root, "calm", false);
    let (hit, hit_weights, sent) = run(root, "hit", true);
    assert!(sent >= 10, "only {sent} hostile connections were made");
    assert_eq!(calm["consumed"], hit["consumed"]);
    assert!(calm_weights == hit_weights, "the weights differ");
}
