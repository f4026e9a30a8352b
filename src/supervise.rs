//! `rho run FILE`: a whole pipeline on one machine, as child processes, supervised.
//!
//! The run config holds the three process configs (without the endpoints, which the supervisor
//! picks on loopback) and the number of selectors. The supervisor writes each process's
//! config into the run directory, starts the loader, the trainer and the selectors, restarts a
//! selector that dies, shows one progress line for the run, and on Ctrl-C or SIGTERM stops the
//! trainer first (it checkpoints) and then the rest. Everything stays in the run directory:
//! configs, logs, metrics, reports, checkpoints, and the run's fresh secret, with which every
//! message is signed (unless a section names its own `secret_file`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rho_loader::LoaderConfig;
use rho_selector::SelectorConfig;
use rho_trainer::TrainerConfig;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunConfig {
    /// Where configs, logs, metrics, reports and checkpoints go (relative to the config file).
    run_dir: PathBuf,
    /// Selector processes (ignored when the trainer's score rule needs no reference).
    #[serde(default = "one")]
    selectors: usize,
    /// Restart a selector that dies before the stream ends. Default true.
    #[serde(default = "yes")]
    restart_selectors: bool,
    loader: Value,
    #[serde(default)]
    selector: Option<Value>,
    trainer: Value,
}

fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}

struct Proc {
    name: String,
    child: Child,
    config: PathBuf,
}

/// Parses a process section of the run config; endpoints are placeholders the supervisor fills.
fn section<T: serde::de::DeserializeOwned>(
    value: &Value,
    name: &str,
    placeholders: &[&str],
) -> anyhow::Result<T> {
    let mut v = value.clone();
    for key in placeholders {
        if v.get(key).is_none() {
            v[*key] = json!("tcp://127.0.0.1:1");
        }
    }
    rho_protocol::config_file::parse_json(&v.to_string())
        .map_err(|e| anyhow::anyhow!("run config, section `{name}`: {e}"))
}

fn start(
    exe: &Path,
    dir: &Path,
    name: &str,
    command: &str,
    config: &Value,
) -> anyhow::Result<Proc> {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(config)?)?;
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let report = std::fs::File::create(dir.join(format!("{name}.report.json")))?;
    let child = Command::new(exe)
        .args([command, "--config"])
        .arg(&path)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(report)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    if let Some(pid) = child.id() {
        std::fs::write(dir.join(format!("{name}.pid")), pid.to_string())?;
    }
    Ok(Proc {
        name: name.to_string(),
        child,
        config: path,
    })
}

async fn wait_file(path: &Path, procs: &mut [Proc]) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.is_empty() {
                return Ok(s.trim().to_string());
            }
        }
        for p in procs.iter_mut() {
            if let Some(status) = p.child.try_wait()? {
                bail!(
                    "{} exited during start-up ({status}); see its log in the run directory",
                    p.name
                );
            }
        }
        if Instant::now() > deadline {
            bail!("{} did not appear", path.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn last_line(path: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(text.lines().last()?).ok()
}

/// Writes a fresh random secret for the run's messages, readable by the owner only.
fn new_secret(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for the run's secret")?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join("secret");
    std::fs::write(&path, hex)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(path)
}

/// Sends SIGTERM (graceful stop) to a child.
fn terminate(p: &Proc) {
    if let Some(pid) = p.child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
}

pub async fn run(
    file: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let rc: RunConfig = rho_protocol::config_file::parse_json(&text)
        .map_err(|e| anyhow::anyhow!("invalid run config {}: {e}", file.display()))?;
    let base = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
    .canonicalize()?;
    let dir = base.join(&rc.run_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    std::fs::write(dir.join("run.json"), &text)?;
    let exe = std::env::current_exe()?;
    let secret = new_secret(&dir)?;

    // Loader.
    let mut loader: LoaderConfig = section(&rc.loader, "loader", &[])?;
    loader.resolve_paths(&base);
    if rc.loader.get("endpoint").is_none() {
        loader.endpoint = "tcp://127.0.0.1:0".into();
    }
    loader.endpoint_file = Some(dir.join("loader.endpoint"));
    loader
        .metrics
        .get_or_insert_with(|| dir.join("loader.metrics.jsonl"));
    loader
        .state_dir
        .get_or_insert_with(|| dir.join("loader-state"));
    loader.secret_file.get_or_insert_with(|| secret.clone());
    loader.validate().context("run config, section `loader`")?;
    let run_id = loader.run_id.clone();
    let _ = std::fs::remove_file(dir.join("loader.endpoint"));
    let mut procs = vec![start(
        &exe,
        &dir,
        "loader",
        "loader",
        &serde_json::to_value(&loader)?,
    )?];
    let loader_ep = wait_file(&dir.join("loader.endpoint"), &mut procs).await?;

    // Trainer.
    let mut trainer: TrainerConfig = section(&rc.trainer, "trainer", &["loader"])?;
    trainer.resolve_paths(&base);
    trainer.run_id = run_id.clone();
    trainer.loader = loader_ep.clone();
    if rc.trainer.get("delivery").is_none() {
        trainer.delivery = "tcp://127.0.0.1:0".into();
    }
    trainer.delivery_file = Some(dir.join("trainer.delivery"));
    trainer
        .metrics
        .get_or_insert_with(|| dir.join("trainer.metrics.jsonl"));
    trainer.secret_file.get_or_insert_with(|| secret.clone());
    if trainer.checkpoint.is_none() {
        trainer.checkpoint = Some(rho_trainer::config::CheckpointConfig {
            dir: dir.join("checkpoints"),
            every: None,
        });
    }
    trainer
        .validate()
        .context("run config, section `trainer`")?;
    let _ = std::fs::remove_file(dir.join("trainer.delivery"));
    procs.push(start(
        &exe,
        &dir,
        "trainer",
        "trainer",
        &serde_json::to_value(&trainer)?,
    )?);
    let uses_selectors = trainer.uses_selectors();

    // Selectors.
    let mut selector_config = None;
    if uses_selectors {
        let delivery = wait_file(&dir.join("trainer.delivery"), &mut procs).await?;
        let section_value = rc.selector.clone().ok_or_else(|| anyhow::anyhow!("run config: the trainer's score rule needs selectors, but there is no `selector` section"))?;
        let mut s: SelectorConfig = section(&section_value, "selector", &["loader", "trainer"])?;
        s.resolve_paths(&base);
        s.run_id = run_id.clone();
        s.loader = loader_ep.clone();
        s.trainer = delivery;
        s.secret_file.get_or_insert_with(|| secret.clone());
        s.validate().context("run config, section `selector`")?;
        for i in 0..rc.selectors.max(1) {
            let mut c = s.clone();
            c.metrics
                .get_or_insert_with(|| dir.join(format!("selector-{i}.metrics.jsonl")));
            procs.push(start(
                &exe,
                &dir,
                &format!("selector-{i}"),
                "selector",
                &serde_json::to_value(&c)?,
            )?);
        }
        selector_config = Some(s);
    }
    eprintln!(
        "rho run `{run_id}`: loader on {loader_ep}, {} selector(s), run directory {}",
        if uses_selectors {
            rc.selectors.max(1)
        } else {
            0
        },
        dir.display()
    );

    let progress = indicatif::ProgressBar::new_spinner();
    let mut restarts = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tokio::pin!(shutdown);
    let mut interrupted = false;
    let outcome: anyhow::Result<()> = loop {
        tokio::select! {
            _ = &mut shutdown => {
                interrupted = true;
                break Ok(());
            }
            _ = tick.tick() => {}
        }
        let mut trainer_done = None;
        let mut failure = None;
        let mut loader_alive = true;
        for p in procs.iter_mut() {
            if let Some(status) = p.child.try_wait()? {
                if p.name == "trainer" {
                    trainer_done = Some(status);
                } else if p.name == "loader" {
                    loader_alive = false;
                    if !status.success() {
                        failure = Some(format!(
                            "the loader failed ({status}); see {}",
                            dir.join("loader.log").display()
                        ));
                    }
                }
            }
        }
        if let Some(f) = failure {
            break Err(anyhow::anyhow!(f));
        }
        if let Some(status) = trainer_done {
            if status.success() {
                break Ok(());
            }
            break Err(anyhow::anyhow!(
                "the trainer failed ({status}); see {}",
                dir.join("trainer.log").display()
            ));
        }
        // A selector that died while there is work left is replaced.
        if let Some(s) = &selector_config {
            for i in 0..procs.len() {
                if !procs[i].name.starts_with("selector") {
                    continue;
                }
                let Some(status) = procs[i].child.try_wait()? else {
                    continue;
                };
                if status.success() || !loader_alive || !rc.restart_selectors {
                    continue;
                }
                restarts += 1;
                let name = procs[i].name.clone();
                tracing::warn!(selector = %name, %status, "selector died; restarting it");
                let mut c = s.clone();
                c.metrics = Some(dir.join(format!("{name}.metrics.jsonl")));
                let _ = std::fs::rename(
                    dir.join(format!("{name}.log")),
                    dir.join(format!("{name}.{restarts}.log")),
                );
                procs[i] = start(&exe, &dir, &name, "selector", &serde_json::to_value(&c)?)?;
            }
        }
        let t = last_line(&dir.join("trainer.metrics.jsonl"));
        let l = last_line(&dir.join("loader.metrics.jsonl"));
        let alive = procs
            .iter_mut()
            .filter(|p| p.name.starts_with("selector"))
            .filter_map(|p| p.child.try_wait().ok())
            .filter(|s| s.is_none())
            .count();
        let get =
            |v: &Option<Value>, k: &str| v.as_ref().and_then(|v| v[k].as_f64()).unwrap_or(0.0);
        progress.set_message(format!(
            "run {run_id}: step {} | {:.0} tok/s | selectors alive {alive} (restarts {restarts}) | in flight {} | redeliveries {} | waiting for data {:.0}%",
            get(&t, "step"), get(&t, "tokens_per_s"), get(&l, "in_flight"), get(&l, "redeliveries"), get(&t, "data_wait_fraction") * 100.0
        ));
        progress.tick();
    };
    progress.finish_and_clear();

    // Stop: the trainer first (it checkpoints on SIGTERM), then whatever still runs.
    if let Some(t) = procs.iter().find(|p| p.name == "trainer") {
        terminate(t);
    }
    for p in procs.iter_mut().filter(|p| p.name == "trainer") {
        let _ = tokio::time::timeout(Duration::from_secs(120), p.child.wait()).await;
    }
    for p in procs.iter().filter(|p| p.name != "trainer") {
        terminate(p);
    }
    for p in procs.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(10), p.child.wait())
            .await
            .is_err()
        {
            let _ = p.child.kill().await;
        }
    }
    let trainer_report: Option<Value> = std::fs::read_to_string(dir.join("trainer.report.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    let summary = json!({
        "run_id": run_id,
        "run_dir": dir,
        "wall_seconds": started.elapsed().as_secs_f64(),
        "selector_restarts": restarts,
        "interrupted": interrupted,
        "configs": procs.iter().map(|p| p.config.clone()).collect::<Vec<_>>(),
        "trainer": trainer_report,
        "loader": last_line(&dir.join("loader.metrics.jsonl")),
    });
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    outcome?;
    let steps = summary["trainer"]["steps"].as_u64().unwrap_or(0);
    eprintln!(
        "rho run `{run_id}` finished: {steps} steps in {:.1} s; summary in {}",
        started.elapsed().as_secs_f64(),
        dir.join("summary.json").display()
    );
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

/// A finished `rho run`: its directory, `summary.json`, and the resident memory of each of its
/// processes sampled while it ran.
pub struct RunOutcome {
    pub name: String,
    pub dir: PathBuf,
    pub summary: Value,
    /// Per process (`loader`, `trainer`, `selector-N`): `(seconds since start, resident KiB)`.
    pub memory: std::collections::BTreeMap<String, Vec<(f64, u64)>>,
}

/// Resident memory of a process, from `/proc` (Linux); `None` elsewhere or once it is gone.
pub fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Writes `config` as `dir/<name>-run.json` and runs it with `rho run` (progress on this
/// terminal), sampling each child's memory twice a second.
pub async fn launch(dir: &Path, name: &str, config: &Value) -> anyhow::Result<RunOutcome> {
    let file = dir.join(format!("{name}-run.json"));
    std::fs::write(&file, serde_json::to_string_pretty(config)?)?;
    let started = Instant::now();
    let mut child = Command::new(std::env::current_exe()?)
        .arg("run")
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting `rho run {}`", file.display()))?;
    let mut memory: std::collections::BTreeMap<String, Vec<(f64, u64)>> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let status = loop {
        tokio::select! {
            s = child.wait() => break s?,
            _ = tick.tick() => {
                let Ok(entries) = std::fs::read_dir(dir) else { continue };
                for entry in entries.flatten() {
                    let path = entry.path();
                    if path.extension().is_none_or(|e| e != "pid") {
                        continue;
                    }
                    let process = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
                    let pid = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse().ok());
                    if let Some(kib) = pid.and_then(resident_kib) {
                        memory.entry(process).or_default().push((started.elapsed().as_secs_f64(), kib));
                    }
                }
            }
        }
    };
    if !status.success() {
        bail!(
            "the `{name}` pipeline failed ({status}); its logs are in {}",
            dir.display()
        );
    }
    let summary_path = dir.join("summary.json");
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(&summary_path)
            .with_context(|| format!("reading {}", summary_path.display()))?,
    )
    .with_context(|| format!("parsing {}", summary_path.display()))?;
    Ok(RunOutcome {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        summary,
        memory,
    })
}
