//! A real user's run, with the faults a real run meets: a supervisor that dies, two supervisors
//! on one run directory, selectors that can never start, configs with mistakes, Ctrl-C, reruns,
//! a full disk. Each test states the rule it holds rho to.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{p, rho};
use serde_json::{json, Value};

/// Data, a tokenizer and models, made once for every test of this file.
fn world() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        common::synth(root, "data", 2, 100, 3);
        common::train_tokenizer(root, "data", 400);
        common::init_model(root, "tiny", 1, "ref");
        common::init_model(root, "tiny", 2, "init");
        dir
    })
    .path()
}

/// A run config in a fresh directory of its own; `edit` changes the JSON.
fn run_config(name: &str, edit: impl FnOnce(&mut Value)) -> (PathBuf, PathBuf) {
    let w = world();
    let home = w.join(name);
    std::fs::create_dir_all(&home).unwrap();
    let mut cfg = json!({
        "run_dir": p(&home.join("run")),
        "selectors": 1,
        "loader": {"run_id": name, "data": {"paths": [p(&w.join("data"))]},
                   "tokenizer": p(&w.join("tokenizer.json")),
                   "seq_len": 64, "batch_size": 4, "epochs": 4, "lease_secs": 2.0,
                   "metrics_interval_secs": 0.2},
        "selector": {"model": p(&w.join("ref")), "tokenizer": p(&w.join("tokenizer.json"))},
        "trainer": {"model": p(&w.join("init")), "selection": {"score": "excess"},
                    "optimizer": {"lr": 0.003}, "resume": true,
                    "checkpoint": {"dir": p(&home.join("run/checkpoints")), "every": 5}},
    });
    edit(&mut cfg);
    let path = home.join("run.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    (path, home.join("run"))
}

/// Starts `rho run CONFIG`, its output captured.
fn start_run(config: &Path) -> std::process::Child {
    Command::new(common::RHO)
        .args(["run", &p(config)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn run_to_end(config: &Path) -> Output {
    Command::new(common::RHO)
        .args(["run", &p(config)])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn pid_of(run_dir: &Path, name: &str) -> u32 {
    common::wait_file(&run_dir.join(format!("{name}.pid")))
        .trim()
        .parse()
        .unwrap()
}

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

/// Waits until the trainer's metrics reach `step`.
fn wait_step(run_dir: &Path, step: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if common::last_step(run_dir) >= step {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the run never reached step {step}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Rule: the processes of a run die with their supervisor, and a run directory has one owner.
#[test]
fn the_processes_of_a_run_die_with_their_supervisor_and_a_run_directory_has_one_owner() {
    let (config, run_dir) = run_config("orphans", |_| {});
    let mut supervisor = start_run(&config);
    wait_step(&run_dir, 3);
    let children: Vec<u32> = ["loader", "trainer", "selector-0"]
        .iter()
        .map(|n| pid_of(&run_dir, n))
        .collect();

    // A second supervisor on the same directory is refused, with the owner's pid.
    let second = run_to_end(&config);
    assert!(!second.status.success());
    let said = stderr(&second);
    assert!(
        said.contains("in use") && said.contains(&supervisor.id().to_string()),
        "{said}"
    );

    // The supervisor dies without a chance to clean up: its children follow.
    signal(supervisor.id(), "-KILL");
    let _ = supervisor.wait();
    let deadline = Instant::now() + Duration::from_secs(30);
    while children.iter().any(|&c| alive(c)) {
        assert!(
            Instant::now() < deadline,
            "orphans still running: {:?}",
            children.iter().filter(|&&c| alive(c)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The trainer stopped as on SIGTERM: it checkpointed, and the next run resumes there and
    // finishes, keeping the killed attempt's logs and metrics.
    let resumed = run_to_end(&config);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let killed_metrics = run_dir.join("attempts/1/trainer.metrics.jsonl");
    assert!(
        killed_metrics.is_file(),
        "the killed attempt's metrics were not kept"
    );
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    let consumed = common::consumed(&summary["trainer"]);
    assert!(
        consumed.first().copied().unwrap_or(0) > 0,
        "the rerun started from the beginning: {consumed:?}"
    );
    for line in std::fs::read_to_string(run_dir.join("trainer.metrics.jsonl"))
        .unwrap()
        .lines()
    {
        serde_json::from_str::<Value>(line).unwrap();
    }
}

/// Rule: Ctrl-C stops a run with a status scripts can tell from a finished run, and says where
/// it stopped.
#[test]
fn an_interrupted_run_says_where_it_stopped_and_exits_with_130() {
    let (config, run_dir) = run_config("sigint", |_| {});
    let supervisor = start_run(&config);
    wait_step(&run_dir, 3);
    signal(supervisor.id(), "-INT");
    let out = supervisor.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(said.contains("stopped at step"), "{said}");
    assert!(!said.contains("finished"), "{said}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["interrupted"], json!(true));
}

/// Rule: configuration errors are found before the run starts, with the cause and the file.
#[test]
fn configuration_errors_are_refused_before_anything_starts() {
    let w = world();
    // A model directory without config.json.
    let broken = w.join("no-config");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(
        w.join("ref/model.safetensors"),
        broken.join("model.safetensors"),
    )
    .unwrap();
    // A truncated checkpoint.
    let truncated = w.join("truncated");
    std::fs::create_dir_all(&truncated).unwrap();
    std::fs::copy(w.join("ref/config.json"), truncated.join("config.json")).unwrap();
    let bytes = std::fs::read(w.join("ref/model.safetensors")).unwrap();
    std::fs::write(
        truncated.join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    // A model whose vocabulary is smaller than the tokenizer's.
    rho(&[
        "model",
        "init",
        "--vocab-size",
        "100",
        "--out",
        &p(&w.join("small-vocab")),
    ]);
    // A model that cannot hold the loader's seq_len.
    rho(&[
        "model",
        "init",
        "--tokenizer",
        &p(&w.join("tokenizer.json")),
        "--max-positions",
        "32",
        "--out",
        &p(&w.join("short")),
    ]);
    // Another tokenizer than the loader's.
    let other = w.join("other-tokenizer.json");
    let mut t: Value =
        serde_json::from_str(&std::fs::read_to_string(w.join("tokenizer.json")).unwrap()).unwrap();
    t["normalizer"] = json!({"type": "Lowercase"});
    std::fs::write(&other, t.to_string()).unwrap();

    type Edit<'a> = Box<dyn Fn(&mut Value) + 'a>;
    let cases: Vec<(&str, Edit, Vec<String>)> = vec![
        (
            "no-config",
            Box::new(|c: &mut Value| c["selector"]["model"] = json!(p(&broken))),
            vec!["config.json".into(), p(&broken)],
        ),
        (
            "truncated",
            Box::new(|c: &mut Value| c["selector"]["model"] = json!(p(&truncated))),
            vec!["truncated".into(), "model.safetensors".into()],
        ),
        (
            "small-vocab",
            Box::new(|c: &mut Value| c["selector"]["model"] = json!(p(&w.join("small-vocab")))),
            vec!["vocabulary of 100".into()],
        ),
        (
            "short",
            Box::new(|c: &mut Value| c["trainer"]["model"] = json!(p(&w.join("short")))),
            vec!["trainer.model".into(), "seq_len is 64".into()],
        ),
        (
            "other-tokenizer",
            Box::new(|c: &mut Value| c["selector"]["tokenizer"] = json!(p(&other))),
            vec![
                "selector.tokenizer".into(),
                "not the loader's tokenizer".into(),
            ],
        ),
        (
            "half-on-cpu",
            Box::new(|c: &mut Value| c["selector"]["dtype"] = json!("bf16")),
            vec!["selector.dtype".into(), "GPU".into()],
        ),
        (
            "zero-selectors",
            Box::new(|c: &mut Value| c["selectors"] = json!(0)),
            vec!["`selectors`".into()],
        ),
        (
            "devices-not-selectors",
            Box::new(|c: &mut Value| c["selector_devices"] = json!(["cpu", "cpu"])),
            vec![
                "`selectors` is 1".into(),
                "`selector_devices` names 2".into(),
            ],
        ),
        (
            "bf16-device-on-cpu",
            Box::new(|c: &mut Value| {
                c["selectors"] = Value::Null;
                c["selector_devices"] = json!(["cpu"]);
                c["selector"]["dtype"] = json!("bf16");
            }),
            vec!["selector_devices[0]".into(), "GPU".into()],
        ),
    ];
    for (name, edit, wanted) in cases {
        let (config, run_dir) = run_config(&format!("preflight-{name}"), edit);
        let started = Instant::now();
        let out = run_to_end(&config);
        let said = stderr(&out);
        assert!(!out.status.success(), "{name}: {said}");
        for w in &wanted {
            assert!(said.contains(w.as_str()), "{name}: `{w}` not in: {said}");
        }
        assert!(
            !run_dir.join("loader.pid").exists(),
            "{name}: processes were started"
        );
        assert!(started.elapsed() < Duration::from_secs(30), "{name}");
    }
}

/// Rule: a process that fails the same way again and again ends the run with its last error;
/// a selector that is not restarted ends it when none is left.
#[test]
fn a_selector_that_can_never_start_ends_the_run_with_its_error() {
    // Weights of one model with the config.json of another: every file is whole, so nothing
    // is found before the start, and the selector fails as it loads them, every time.
    let w = world();
    let mismatch = w.join("mismatch");
    common::init_model(w, "small", 1, "mismatch");
    std::fs::copy(
        w.join("ref/model.safetensors"),
        mismatch.join("model.safetensors"),
    )
    .unwrap();
    let (config, run_dir) = run_config("crashloop", |c| {
        c["selector"]["model"] = json!(p(&mismatch));
        c["max_selector_failures"] = json!(3);
    });
    let started = Instant::now();
    let out = run_to_end(&config);
    let said = stderr(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("selector-0 failed 3 times in a row") && said.contains("mismatch"),
        "{said}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    let logs = std::fs::read_dir(&run_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("selector-0."))
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .count();
    assert_eq!(logs, 3, "one log per attempt");

    // Not restarted: the run ends when no selector is left, and says why.
    let (config, run_dir) = run_config("no-restart", |c| {
        c["restart_selectors"] = json!(false);
    });
    let supervisor = start_run(&config);
    wait_step(&run_dir, 2);
    signal(pid_of(&run_dir, "selector-0"), "-KILL");
    let out = supervisor.wait_with_output().unwrap();
    let said = stderr(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("every selector has exited"), "{said}");
}

/// Rule: a standalone trainer whose delivery endpoint is taken says so at once, without waiting
/// for a loader.
#[test]
fn a_taken_delivery_port_is_reported_at_once() {
    let w = world();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let home = w.join("taken");
    std::fs::create_dir_all(&home).unwrap();
    let config = home.join("trainer.json");
    std::fs::write(
        &config,
        json!({"loader": "tcp://127.0.0.1:1", "delivery": format!("tcp://127.0.0.1:{port}"),
               "model": p(&w.join("init")), "selection": {"score": "excess"}})
        .to_string(),
    )
    .unwrap();
    let mut child = Command::new(common::RHO)
        .args(["trainer", "--config", &p(&config)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the trainer waited instead of reporting its taken port");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    assert!(!status.success());
    let said = stderr(&out);
    assert!(
        said.contains("delivery") && said.contains(&port.to_string()),
        "{said}"
    );
}

/// A tmpfs of `mib` MiB mounted at `dir` (root only); `None` where mounting is not allowed.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u32) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m"),
                "tmpfs",
                &p(dir),
            ])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").args(["-l", &p(&self.0)]).status();
    }
}

/// Rule: a write failure names the file, the first cause is the one reported, logs and metrics
/// failing never kill a process that can still train, and every metrics line is whole or absent.
#[test]
fn a_full_disk_names_the_file_keeps_metrics_whole_and_reports_the_first_cause() {
    let w = world();
    let home = w.join("full");
    let Some(_disk) = Tmpfs::mount(&home.join("run"), 16) else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root); the metrics writer's unit tests cover whole lines");
        return;
    };
    let (config, run_dir) = run_config("full", |c| {
        c["trainer"]["checkpoint"]["every"] = json!(1000);
        c["trainer"]["max_steps"] = json!(60);
    });
    let supervisor = start_run(&config);
    wait_step(&run_dir, 3);
    // Fill the disk.
    let filler = run_dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![7u8; 1 << 16];
    while std::io::Write::write_all(&mut f, &block).is_ok() {}
    drop(f);
    let out = supervisor.wait_with_output().unwrap();
    let said = stderr(&out);
    assert!(!out.status.success(), "{said}");
    // The trainer trained to the end of the stream, then could not write its checkpoint: that is
    // the error shown, with the file, before anything about the summary.
    let failure = said
        .lines()
        .find(|l| l.starts_with("Error:"))
        .unwrap_or_else(|| panic!("no error line: {said}"));
    assert!(failure.contains("the trainer failed"), "{said}");
    assert!(failure.contains("No space left on device"), "{said}");
    assert!(failure.contains(&p(&run_dir.join("checkpoints"))), "{said}");
    assert!(!said.contains("panicked"), "{said}");
    // Every metrics line is whole.
    for name in ["trainer", "loader", "selector-0"] {
        let text = std::fs::read_to_string(run_dir.join(format!("{name}.metrics.jsonl")))
            .unwrap_or_default();
        for line in text.lines() {
            serde_json::from_str::<Value>(line)
                .unwrap_or_else(|e| panic!("{name}: a broken metrics line {line:?}: {e}"));
        }
        assert!(text.is_empty() || text.ends_with('\n'), "{name}");
    }
    // The previous checkpoint, if any, is intact; no partial one looks complete.
    std::fs::remove_file(&filler).unwrap();
    let (_c, found) =
        rho_trainer::checkpoint::Checkpoints::open(&run_dir.join("checkpoints"), true, false)
            .unwrap();
    if let Some((path, _)) = found {
        rho_trainer::checkpoint::verify(&path).unwrap();
    }
}

/// Rule: an unwritable run directory is named.
#[test]
fn a_read_only_run_directory_is_named() {
    let w = world();
    let home = w.join("readonly");
    let Some(_disk) = Tmpfs::mount(&home.join("run"), 4) else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    };
    let (config, run_dir) = run_config("readonly", |_| {});
    let ok = Command::new("mount")
        .args(["-o", "remount,ro", &p(&run_dir)])
        .status()
        .unwrap();
    assert!(ok.success());
    let out = run_to_end(&config);
    let said = stderr(&out);
    assert!(!out.status.success());
    assert!(said.contains(&p(&run_dir)), "{said}");
    assert!(said.contains("Read-only file system"), "{said}");
}

/// Rule: a process refused for its secret is told where to look, in its own log.
#[test]
fn a_selector_with_another_secret_says_so_in_its_log() {
    let w = world();
    let wrong = w.join("wrong-secret");
    std::fs::write(&wrong, "not the run's secret").unwrap();
    let (config, run_dir) = run_config("secret", |c| {
        c["selector"]["secret_file"] = json!(p(&wrong));
        c["selector"]["liveness"] = json!({"heartbeat_secs": 0.2, "peer_timeout_secs": 1.0});
    });
    let mut supervisor = start_run(&config);
    let deadline = Instant::now() + Duration::from_secs(60);
    let log = run_dir.join("selector-0.log");
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("same secret") {
            assert!(text.contains("secret_file"), "{text}");
            break;
        }
        if Instant::now() > deadline {
            let _ = supervisor.kill();
            panic!("the selector's log never said what may be wrong: {text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The refusing side counts and logs it.
    let loader = std::fs::read_to_string(run_dir.join("loader.log")).unwrap_or_default();
    let trainer = std::fs::read_to_string(run_dir.join("trainer.log")).unwrap_or_default();
    assert!(
        loader.contains("refused") || trainer.contains("refused"),
        "{loader}\n{trainer}"
    );
    signal(supervisor.id(), "-INT");
    let _ = supervisor.wait();
}

/// Rule: selection never breaks the backward pass. The starting checkpoint as its own
/// reference (every excess loss exactly 0, so the top 60% are the first positions) with a
/// vocabulary of 49,152 (SmolLM2's: the LM head's rows then split into chunks, some of which
/// keep no token) trains to the end through `rho run`, with finite losses and a checkpoint that
/// loads.
#[test]
fn the_starting_model_as_its_own_reference_trains_to_the_end() {
    let w = world();
    let model = w.join("self-ref-49152");
    rho(&[
        "model",
        "init",
        "--preset",
        "tiny",
        "--seed",
        "4",
        "--vocab-size",
        "49152",
        "--out",
        &p(&model),
    ]);
    let (config, run) = run_config("self-ref", |c| {
        c["selector"]["model"] = json!(p(&model));
        c["trainer"]["model"] = json!(p(&model));
        c["trainer"]["selection"]["schedule"] = json!({"kind": "constant", "ratio": 0.6});
        c["trainer"]["max_steps"] = json!(12);
    });
    let out = run_to_end(&config);
    assert!(out.status.success(), "{}", stderr(&out));
    let metrics = std::fs::read_to_string(run.join("trainer.metrics.jsonl")).unwrap();
    let lines: Vec<Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 12);
    for l in &lines {
        for key in ["loss_all", "loss_selected", "grad_norm"] {
            let x = l[key].as_f64().unwrap();
            assert!(x.is_finite() && x > 0.0, "{key} = {x} in {l}");
        }
    }
    // At the first step the model is its reference: no token has an excess loss.
    let first = lines[0]["mean_excess"].as_f64().unwrap();
    assert!(first.abs() < 1e-3, "mean excess {first} at the first step");
    common::assert_model_loads(&run.join("checkpoints").join(latest_checkpoint(&run)));
}

/// Rule: a checkpoint knows what it was trained on. A run resumed on another stream (the
/// loader's `seq_len`, `batch_size` or `seed` changed, a shard added) or against another
/// reference model is refused, with the changed item named, instead of continuing at the old
/// cursor of a different stream; a change the config accepts (`accept_stream_changes`) resumes.
/// And `max_steps` is the global step to stop at.
#[test]
fn a_resume_on_another_stream_is_refused_with_the_item_named() {
    let w = world();
    let data = w.join("resume-data");
    std::fs::create_dir_all(&data).unwrap();
    for e in std::fs::read_dir(w.join("data")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), data.join(e.file_name())).unwrap();
    }
    let (config, run) = run_config("resume-stream", |c| {
        c["loader"]["data"]["paths"] = json!([p(&data)]);
        c["trainer"]["max_steps"] = json!(5);
    });
    let out = run_to_end(&config);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(common::last_step(&run), 5);
    let original: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let rerun = |edit: &dyn Fn(&mut Value)| {
        let mut c = original.clone();
        c["trainer"]["max_steps"] = json!(8);
        edit(&mut c);
        std::fs::write(&config, c.to_string()).unwrap();
        run_to_end(&config)
    };
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(Edit, &str, &str)> = vec![
        (
            Box::new(|c| c["loader"]["seq_len"] = json!(32)),
            "loader.seq_len: 64 in the",
            ", 32 ",
        ),
        (
            Box::new(|c| c["loader"]["batch_size"] = json!(8)),
            "loader.batch_size: 4 in the",
            ", 8 ",
        ),
        (
            Box::new(|c| c["loader"]["seed"] = json!(5)),
            "loader.seed: 0 in the",
            ", 5 ",
        ),
        (
            Box::new(move |c| c["selector"]["model"] = json!(p(&world().join("init")))),
            "was trained against is the reference model",
            "`trainer.selection.change_reference`",
        ),
    ];
    for (edit, named, also) in &cases {
        let out = rerun(edit.as_ref());
        let said = stderr(&out);
        assert!(!out.status.success(), "resumed on another stream: {said}");
        assert!(
            said.contains(named) && said.contains(also),
            "`{named}` not named: {said}"
        );
        assert_eq!(
            latest_checkpoint(&run),
            "step-00000005",
            "trained on: {said}"
        );
    }
    // A shard appended to the corpus: refused, then accepted when the config says so.
    let first = std::fs::read_dir(&data)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let name = format!("zz-{}", first.file_name().unwrap().to_string_lossy());
    std::fs::copy(&first, data.join(name)).unwrap();
    let out = rerun(&|_| {});
    let said = stderr(&out);
    assert!(!out.status.success(), "resumed on a changed corpus: {said}");
    assert!(said.contains("loader.data.paths: 2 shards"), "{said}");
    assert!(said.contains("3 shards"), "{said}");
    let out = rerun(&|c| c["trainer"]["accept_stream_changes"] = json!(["loader.data.paths"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(common::last_step(&run), 8, "max_steps is the global step");
    assert_eq!(latest_checkpoint(&run), "step-00000008");
}

/// The name of the run's latest checkpoint.
fn latest_checkpoint(run: &Path) -> String {
    std::fs::read_to_string(run.join("checkpoints/latest"))
        .unwrap()
        .trim()
        .to_string()
}
