//! Running a whole `rho run` from another command (the demo, the benchmarks): the run's
//! summary and each process's memory over time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::Command;

use super::summary::Summary;
use crate::runtime::SUPERVISOR_PID_VAR;

/// A finished `rho run`: its directory, `summary.json`, and the resident memory of each of its
/// processes sampled while it ran.
pub struct RunOutcome {
    pub name: String,
    pub dir: PathBuf,
    pub summary: Summary,
    /// Per process (`loader`, `trainer`, `selector-N`): `(seconds since start, resident KiB)`.
    pub memory: std::collections::BTreeMap<String, Vec<(f64, u64)>>,
}

/// Resident memory of a process, from `/proc` (Linux); `None` elsewhere or once it is gone.
pub fn resident_kib(pid: u32) -> Option<u64> {
    status_kib(&pid.to_string(), "VmRSS")
}

/// A memory line of `/proc/<process>/status` (`VmRSS`, `VmHWM`, ...) in KiB; `process` is a pid
/// or `self`.
pub fn status_kib(process: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{process}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Samples the resident memory of every process whose `<name>.pid` is in `dir`.
fn sample_memory(
    dir: &Path,
    at: f64,
    memory: &mut std::collections::BTreeMap<String, Vec<(f64, u64)>>,
) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "pid") {
            continue;
        }
        let process = path.file_stem().unwrap_or_default().to_string_lossy();
        let pid = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        if let Some(kib) = pid.and_then(resident_kib) {
            memory
                .entry(process.into_owned())
                .or_default()
                .push((at, kib));
        }
    }
}

/// Writes `config` as `dir/<name>-run.json` and runs it with `rho run` (progress on this
/// terminal), sampling each child's memory twice a second.
pub async fn launch(
    dir: &Path,
    name: &str,
    config: &impl serde::Serialize,
) -> anyhow::Result<RunOutcome> {
    let file = dir.join(format!("{name}-run.json"));
    std::fs::write(&file, serde_json::to_string_pretty(config)?)?;
    let started = Instant::now();
    let mut child = Command::new(std::env::current_exe()?)
        .arg("run")
        .arg(&file)
        // The run dies with this process, as a run's processes die with `rho run`.
        .env(SUPERVISOR_PID_VAR, std::process::id().to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting `rho run {}`", file.display()))?;
    let mut memory = Default::default();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let status = loop {
        tokio::select! {
            s = child.wait() => break s?,
            _ = tick.tick() => sample_memory(dir, started.elapsed().as_secs_f64(), &mut memory),
        }
    };
    if !status.success() {
        bail!(
            "the `{name}` pipeline failed ({status}); its logs are in {}",
            dir.display()
        );
    }
    let summary_path = dir.join("summary.json");
    let text = std::fs::read_to_string(&summary_path)
        .with_context(|| format!("reading {}", summary_path.display()))?;
    let summary = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", summary_path.display()))?;
    Ok(RunOutcome {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        summary,
        memory,
    })
}
