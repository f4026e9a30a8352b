//! A run across hosts, on real network boundaries: three network namespaces joined by a bridge
//! (veth pairs) play the loader's, the selector's and the trainer's hosts; `rho run` starts each
//! process in its namespace (`launch.engine: "wrap"`, `ip netns exec`), every endpoint is bound on
//! its host's address and signed with the run's secret. The selector's link is cut mid-run
//! (`ip link set down`) and restored; the run ends with the same weights, bit for bit, as the same
//! run on loopback, having trained on every batch exactly once and in order. Skipped, with the
//! reason printed, where namespaces cannot be made (not root, no `ip`).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{finish, p, spawn};
use serde_json::json;

/// Three namespaces on one bridge, removed when dropped.
struct Hosts {
    prefix: String,
    /// The hosts' addresses: loader, selector, trainer.
    addr: [String; 3],
}

const HOSTS: [&str; 3] = ["loader", "selector", "trainer"];

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("`ip` cannot run: {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "`ip {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

impl Hosts {
    fn make() -> Result<Hosts, String> {
        let id = std::process::id();
        let prefix = format!("rho{id}");
        let subnet = format!("10.{}.{}", 100 + (id / 250) % 100, id % 250);
        let hosts = Hosts {
            prefix: prefix.clone(),
            addr: [1, 2, 3].map(|n| format!("{subnet}.{n}")),
        };
        let sw = hosts.ns("sw");
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for (i, h) in HOSTS.iter().enumerate() {
            let ns = hosts.ns(h);
            ip(&["netns", "add", &ns])?;
            let port = format!("p{i}");
            ip(&[
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &sw,
            ])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", hosts.addr[i]),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
        }
        Ok(hosts)
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// Takes the bridge's port of host `i` down or up.
    fn link(&self, i: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.ns("sw"), "link", "set", &format!("p{i}"), state]).unwrap();
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for h in HOSTS.iter().chain(&["sw"]) {
            let _ = ip(&["netns", "del", &self.ns(h)]);
        }
    }
}

fn setup(root: &Path) {
    common::synth(root, "data", 2, 100, 3);
    common::train_tokenizer(root, "data", 400);
    common::init_model(root, "tiny", 1, "ref");
    common::init_model(root, "tiny", 2, "init");
}

fn run_config(root: &Path, name: &str, hosts: Option<&Hosts>) -> std::path::PathBuf {
    let mut cfg = json!({
        "run_dir": name,
        "loader": {"run_id": "hosts", "data": {"paths": ["data"]}, "tokenizer": "tokenizer.json",
                   "seq_len": 64, "batch_size": 4, "lease_secs": 1.0, "selector_timeout_secs": 2.0,
                   "metrics_interval_secs": 0.2},
        "selector": {"model": "ref", "tokenizer": "tokenizer.json",
                     "liveness": {"peer_timeout_secs": 2.0}},
        "trainer": {"model": "init", "selection": {"score": "excess"}, "optimizer": {"lr": 0.003},
                    "liveness": {"peer_timeout_secs": 2.0}},
    });
    if let Some(h) = hosts {
        cfg["loader"]["endpoint"] = format!("tcp://{}:0", h.addr[0]).into();
        cfg["trainer"]["delivery"] = format!("tcp://{}:0", h.addr[2]).into();
        let exec = |i: usize| json!(["ip", "netns", "exec", h.ns(HOSTS[i])]);
        cfg["launch"] =
            json!({"engine": "wrap", "loader": exec(0), "selector": exec(1), "trainer": exec(2)});
    }
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

#[test]
fn a_run_across_hosts_with_a_cut_link_ends_as_on_loopback() {
    let hosts = match Hosts::make() {
        Ok(h) => h,
        Err(why) => {
            eprintln!("skipped: network namespaces cannot be made here: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);

    let started = Instant::now();
    let local = finish(
        spawn(&["run", &p(&run_config(root, "local", None))]),
        "the run on loopback",
    );
    let local_secs = started.elapsed().as_secs_f64();
    let steps = local["trainer"]["steps"].as_u64().unwrap();
    assert!(steps > 30, "{steps} steps");

    let started = Instant::now();
    let across = spawn(&["run", &p(&run_config(root, "across", Some(&hosts)))]);
    let run_dir = root.join("across");
    let endpoint = common::wait_file(&run_dir.join("loader.endpoint"));
    assert_eq!(
        endpoint.rsplit_once(':').unwrap().0,
        format!("tcp://{}", hosts.addr[0])
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while common::last_step(&run_dir) < 5 {
        assert!(
            Instant::now() < deadline,
            "the run across hosts never got going"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The selector's host drops off the network for longer than every timeout, and comes back.
    hosts.link(1, false);
    std::thread::sleep(Duration::from_secs(4));
    hosts.link(1, true);
    let summary = finish(across, "the run across hosts");
    let across_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{steps} steps: {local_secs:.1} s on loopback, {across_secs:.1} s across three hosts with a 4 s cut"
    );

    assert_eq!(
        common::consumed(&summary["trainer"]),
        (0..steps).collect::<Vec<_>>(),
        "every batch once, in order"
    );
    assert!(
        weights(root, "local") == weights(root, "across"),
        "the final weights differ"
    );
}

#[test]
fn an_unsigned_process_bound_beyond_loopback_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::synth(root, "data", 1, 20, 3);
    common::train_tokenizer(root, "data", 400);
    let cfg = json!({"run_id": "open", "data": {"paths": ["data"]}, "tokenizer": "tokenizer.json",
                     "seq_len": 64, "batch_size": 4, "endpoint": "tcp://0.0.0.0:0"});
    let path = root.join("loader.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rho"))
        .args(["loader", "--config", &p(&path)])
        .env_remove("RHO_SECRET")
        .current_dir(root)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("endpoint") && err.contains("tcp://0.0.0.0:0") && err.contains("secret"),
        "{err}"
    );
}
