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

#[derive(Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct RunConfig {
    /// Where configs, logs, metrics, reports and checkpoints go (relative to the config file).
    run_dir: PathBuf,
    /// Selector processes, at least 1 when the trainer's score rule needs reference losses
    /// (ignored otherwise).
    #[serde(default = "one")]
    selectors: usize,
    /// Restart a selector that dies before the stream ends. Default true.
    #[serde(default = "yes")]
    restart_selectors: bool,
    /// A selector that fails this many times in a row, each time within
    /// `SHORT_LIFE` of its start, ends the run with its last error. Default 5.
    #[serde(default = "five")]
    max_selector_failures: u32,
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
fn five() -> u32 {
    5
}

/// The environment variable through which a child learns its supervisor's pid (it stops when
/// its parent is no longer that process).
pub const SUPERVISOR_PID_VAR: &str = "RHO_SUPERVISOR_PID";

/// A selector that dies sooner than this after its start failed "at once": repeated, it is a
/// configuration error, not bad luck.
const SHORT_LIFE: Duration = Duration::from_secs(30);
/// The first restart waits this long, each further one twice as long, up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What a process wrote to stderr, kept in memory: its last error reaches the terminal even
/// when its log file cannot be written (a full disk).
#[derive(Default)]
struct TailState {
    /// The last lines.
    lines: std::collections::VecDeque<String>,
    /// The last error report (`Error: ...` and its causes, up to a backtrace).
    error: Vec<String>,
    in_error: bool,
}
type Tail = std::sync::Arc<std::sync::Mutex<TailState>>;
const TAIL_LINES: usize = 50;
const ERROR_LINES: usize = 12;

struct Proc {
    name: String,
    child: Child,
    tail: Tail,
    config: PathBuf,
    started: Instant,
    /// Failures in a row, each soon after a start.
    quick_failures: u32,
    /// Exited and waiting to be restarted at this moment.
    restart_at: Option<Instant>,
    /// Exited for good.
    done: bool,
    /// Exited for good after a failure.
    failed: bool,
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

/// Writes a file; the error names it.
fn write(path: &Path, bytes: impl AsRef<[u8]>) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// A line for the person at the terminal; a terminal that is gone is not an error.
fn say(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{text}");
}

fn start(
    exe: &Path,
    dir: &Path,
    name: &str,
    command: &str,
    config: &Value,
) -> anyhow::Result<Proc> {
    let path = dir.join(format!("{name}.json"));
    write(&path, serde_json::to_string_pretty(config)?)?;
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let tail = Tail::default();
    let report_path = dir.join(format!("{name}.report.json"));
    let report = std::fs::File::create(&report_path)
        .with_context(|| format!("creating {}", report_path.display()))?;
    let mut child = Command::new(exe)
        .args([command, "--config"])
        .arg(&path)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env(SUPERVISOR_PID_VAR, std::process::id().to_string())
        // Errors are reported with their causes; a backtrace would bury them in the log.
        .env("RUST_LIB_BACKTRACE", "0")
        .stdin(std::process::Stdio::null())
        .stdout(report)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(copy_log(stderr, log, log_path, tail.clone()));
    }
    if let Some(pid) = child.id() {
        write(&dir.join(format!("{name}.pid")), pid.to_string())?;
    }
    Ok(Proc {
        name: name.to_string(),
        child,
        tail,
        config: path,
        started: Instant::now(),
        quick_failures: 0,
        restart_at: None,
        done: false,
        failed: false,
    })
}

/// Copies a child's stderr into its log file line by line, keeping the last lines in `tail`.
/// A log that cannot be written is warned about once; the copy goes on (the child must never
/// block on a full pipe).
async fn copy_log(
    stderr: tokio::process::ChildStderr,
    mut log: std::fs::File,
    path: PathBuf,
    tail: Tail,
) {
    use std::io::Write;
    use tokio::io::AsyncBufReadExt;
    let mut reader = tokio::io::BufReader::new(stderr);
    let mut line = Vec::new();
    let mut failed = false;
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if let Err(e) = log.write_all(&line) {
            if !failed {
                tracing::warn!(log = %path.display(), "cannot write a process's log: {e}; its last lines are kept in memory");
                failed = true;
            }
        }
        let text = strip_ansi(String::from_utf8_lossy(&line).trim_end());
        if let Ok(mut t) = tail.lock() {
            if text.starts_with("Error:") {
                t.error.clear();
                t.in_error = true;
            } else if text.starts_with("Stack backtrace:") || text.starts_with("stack backtrace:") {
                t.in_error = false;
            }
            if t.in_error && t.error.len() < ERROR_LINES && !text.trim().is_empty() {
                t.error.push(text.trim().to_string());
            }
            if t.lines.len() == TAIL_LINES {
                t.lines.pop_front();
            }
            t.lines.push_back(text);
        }
    }
}

async fn wait_file(path: &Path, dir: &Path, procs: &mut [Proc]) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.is_empty() {
                return Ok(s.trim().to_string());
            }
        }
        for p in procs.iter_mut() {
            if let Some(status) = p.child.try_wait()? {
                // Let the log copy catch up with the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                bail!(
                    "{} exited during start-up ({status}){}",
                    p.name,
                    last_error(p, dir)
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

/// The last error a process reported (`Error: ...` and its causes), else its last logged
/// error or line, as `": <text> (see <log>)"`, or a pointer to its log.
fn last_error(p: &Proc, dir: &Path) -> String {
    let log = dir.join(format!("{}.log", p.name));
    let (error, lines) = p
        .tail
        .lock()
        .map(|t| (t.error.clone(), t.lines.iter().cloned().collect::<Vec<_>>()))
        .unwrap_or_default();
    let text = if !error.is_empty() {
        Some(
            error
                .iter()
                .filter(|l| *l != "Caused by:")
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(" "),
        )
    } else {
        lines
            .iter()
            .rev()
            .find(|l| l.contains("ERROR"))
            .or_else(|| lines.iter().rev().find(|l| !l.trim().is_empty()))
            .map(|l| l.trim().to_string())
    };
    match text {
        Some(t) => format!(": {t} (see {})", log.display()),
        None => format!("; see {}", log.display()),
    }
}

/// Removes terminal color sequences.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
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
    write(&path, hex)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
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

/// Moves what an earlier attempt left in the run directory (logs, metrics, reports, the
/// summary) into `attempts/N/`, so that a rerun keeps them. Returns the attempt's directory.
fn keep_earlier_attempt(dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let kept = name == "summary.json"
            || name.ends_with(".log")
            || name.ends_with(".metrics.jsonl")
            || name.ends_with(".report.json");
        if kept && entry.path().is_file() {
            files.push(entry.path());
        }
    }
    if files.is_empty() {
        return Ok(None);
    }
    let attempts = dir.join("attempts");
    let mut n = 1;
    while attempts.join(n.to_string()).exists() {
        n += 1;
    }
    let to = attempts.join(n.to_string());
    std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
    for f in files {
        let dest = to.join(f.file_name().unwrap_or_default());
        std::fs::rename(&f, &dest)
            .with_context(|| format!("moving {} to {}", f.display(), dest.display()))?;
    }
    Ok(Some(to))
}

/// Checks a model directory against the tokenizer and the window it will see.
fn check_model(
    field: &str,
    model: &Path,
    tokenizer: &Path,
    tokenizer_vocab: usize,
    seq_len: usize,
) -> anyhow::Result<()> {
    let m = rho_model::checkpoint::inspect(model)
        .map_err(|e| anyhow::anyhow!("run config, `{field}`: {e}"))?;
    if m.vocab_size < tokenizer_vocab {
        bail!(
            "run config, `{field}`: {} has a vocabulary of {} ids, but the tokenizer {} has {}: the model cannot score every token",
            model.display(),
            m.vocab_size,
            tokenizer.display(),
            tokenizer_vocab
        );
    }
    if m.max_positions < seq_len {
        bail!(
            "run config, `{field}`: {} holds sequences of at most {} positions (max_position_embeddings), but the loader's seq_len is {seq_len}",
            model.display(),
            m.max_positions
        );
    }
    Ok(())
}

/// What can be found wrong before any process starts: the models, the tokenizers and the
/// window length against each other.
fn preflight(
    loader: &LoaderConfig,
    selector: Option<&SelectorConfig>,
    trainer: &TrainerConfig,
) -> anyhow::Result<()> {
    if let (Some(ck), false) = (&trainer.checkpoint, trainer.resume) {
        let existing = rho_trainer::checkpoint::list(&ck.dir)?;
        if let (Some((_, newest)), false) = (existing.first(), ck.overwrite) {
            bail!(
                "run config, `trainer.checkpoint.dir`: {} holds checkpoints of an earlier run (newest: {}); a run never writes over checkpoints it did not make: set `trainer.resume: true` to continue it, `trainer.checkpoint.overwrite: true` to start afresh, or choose another directory",
                ck.dir.display(),
                newest.display()
            );
        }
    }
    if loader.scored.is_some() {
        return Ok(());
    }
    let tok = rho_protocol::tokenizer::load(&loader.tokenizer).map_err(|e| {
        anyhow::anyhow!(
            "run config, `loader.tokenizer` {}: {e}",
            loader.tokenizer.display()
        )
    })?;
    let vocab = tok.tokenizer.get_vocab_size(true);
    if let Some(s) = selector {
        let theirs = rho_protocol::tokenizer::load(&s.tokenizer).map_err(|e| {
            anyhow::anyhow!(
                "run config, `selector.tokenizer` {}: {e}",
                s.tokenizer.display()
            )
        })?;
        if theirs.fingerprint != tok.fingerprint {
            bail!(
                "run config: `selector.tokenizer` {} is not the loader's tokenizer {}: the selectors would refuse every batch",
                s.tokenizer.display(),
                loader.tokenizer.display()
            );
        }
        check_model(
            "selector.model",
            &s.model,
            &loader.tokenizer,
            vocab,
            loader.seq_len,
        )?;
        let device = rho_model::parse_device(&s.device)
            .map_err(|e| anyhow::anyhow!("run config, `selector.device`: {e}"))?;
        rho_model::parse_dtype(&s.dtype, &device)
            .map_err(|e| anyhow::anyhow!("run config, `selector.dtype`: {e}"))?;
    }
    if let (rho_trainer::config::BackendChoice::Candle, Some(m)) = (trainer.backend, &trainer.model)
    {
        check_model("trainer.model", m, &loader.tokenizer, vocab, loader.seq_len)?;
    }
    Ok(())
}

/// Waits until no other process holds `dir` (a trainer of an earlier supervisor finishing its
/// last checkpoint), for at most `limit`.
async fn wait_for_owner(dir: &Path, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut said = false;
    loop {
        match rho_protocol::lock::DirLock::acquire(dir) {
            Ok(_) => return Ok(()),
            Err(e @ rho_protocol::lock::LockError::Io { .. }) => return Err(e.into()),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(e) => {
                if !said {
                    say(&format!("waiting: {e}"));
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// How a supervised run ended (errors aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// The stream ended, or the trainer's `max_steps`.
    Finished,
    /// Stopped by a signal before that; the run resumes from its checkpoint when run again.
    Stopped,
}

pub async fn run(
    file: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<RunEnd> {
    let started = Instant::now();
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let rc: RunConfig = rho_protocol::config_file::parse_json(&text)
        .map_err(|e| anyhow::anyhow!("invalid run config {}: {e}", file.display()))?;
    let base = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
    .canonicalize()
    .with_context(|| format!("resolving the directory of {}", file.display()))?;
    let dir = base.join(&rc.run_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    // One owner per run directory: held until this process exits, however it exits.
    let _owner = rho_protocol::lock::DirLock::acquire(&dir)?;

    // Every section is parsed and checked before anything is written or started.
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
    let mut trainer: TrainerConfig = section(&rc.trainer, "trainer", &["loader"])?;
    trainer.resolve_paths(&base);
    if rc.trainer.get("delivery").is_none() {
        trainer.delivery = "tcp://127.0.0.1:0".into();
    }
    trainer.delivery_file = Some(dir.join("trainer.delivery"));
    trainer
        .metrics
        .get_or_insert_with(|| dir.join("trainer.metrics.jsonl"));
    if trainer.checkpoint.is_none() {
        trainer.checkpoint = Some(rho_trainer::config::CheckpointConfig {
            dir: dir.join("checkpoints"),
            every: None,
            overwrite: false,
        });
    }
    if rc.max_selector_failures == 0 {
        bail!("run config, `max_selector_failures`: must be at least 1");
    }
    let uses_selectors = trainer.uses_selectors();
    let selector = if uses_selectors {
        if rc.selectors == 0 {
            bail!("run config, `selectors`: 0, but the trainer's score rule ({:?}) needs reference losses from at least one selector; or serve a scored cache and set `trainer.source` to \"loader\"", trainer.selection.score);
        }
        let section_value = rc.selector.clone().ok_or_else(|| anyhow::anyhow!("run config: the trainer's score rule needs selectors, but there is no `selector` section"))?;
        let mut s: SelectorConfig = section(&section_value, "selector", &["loader", "trainer"])?;
        s.resolve_paths(&base);
        Some(s)
    } else {
        None
    };
    loader.validate().context("run config, section `loader`")?;
    trainer
        .validate()
        .context("run config, section `trainer`")?;
    if let Some(s) = &selector {
        s.validate().context("run config, section `selector`")?;
    }
    preflight(&loader, selector.as_ref(), &trainer)?;

    if let Some(kept) = keep_earlier_attempt(&dir)? {
        say(&format!(
            "kept the earlier attempt's logs, metrics and reports in {}",
            kept.display()
        ));
    }
    write(&dir.join("run.json"), &text)?;
    let exe = std::env::current_exe()?;
    let secret = new_secret(&dir)?;

    // Loader.
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
    let loader_ep = wait_file(&dir.join("loader.endpoint"), &dir, &mut procs).await?;

    // Trainer.
    trainer.run_id = run_id.clone();
    trainer.loader = loader_ep.clone();
    trainer.secret_file.get_or_insert_with(|| secret.clone());
    trainer
        .validate()
        .context("run config, section `trainer`")?;
    if let Some(ck) = &trainer.checkpoint {
        wait_for_owner(&ck.dir, Duration::from_secs(120)).await?;
    }
    let _ = std::fs::remove_file(dir.join("trainer.delivery"));
    procs.push(start(
        &exe,
        &dir,
        "trainer",
        "trainer",
        &serde_json::to_value(&trainer)?,
    )?);

    // Selectors.
    let mut selector_config = None;
    if let Some(mut s) = selector {
        let delivery = wait_file(&dir.join("trainer.delivery"), &dir, &mut procs).await?;
        s.run_id = run_id.clone();
        s.loader = loader_ep.clone();
        s.trainer = delivery;
        s.secret_file.get_or_insert_with(|| secret.clone());
        s.validate().context("run config, section `selector`")?;
        for i in 0..rc.selectors {
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
    say(&format!(
        "rho run `{run_id}`: loader on {loader_ep}, {} selector(s), run directory {}",
        if uses_selectors { rc.selectors } else { 0 },
        dir.display()
    ));

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
        match watch(
            &mut procs,
            &dir,
            &exe,
            &rc,
            selector_config.as_ref(),
            &mut restarts,
            &progress,
        )
        .await
        {
            Ok(Watch::Running) => {}
            Ok(Watch::Finished) => break Ok(()),
            Ok(Watch::Stopped) => {
                interrupted = true;
                break Ok(());
            }
            Err(e) => break Err(e),
        }
        let t = last_line(&dir.join("trainer.metrics.jsonl"));
        let l = last_line(&dir.join("loader.metrics.jsonl"));
        let alive = procs
            .iter_mut()
            .filter(|p| p.name.starts_with("selector") && p.restart_at.is_none() && !p.done)
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
    if interrupted {
        say(&format!(
            "rho run `{run_id}`: stopping (the trainer checkpoints first)"
        ));
    }

    // Stop: the trainer first (it checkpoints on SIGTERM), then whatever still runs.
    if let Some(t) = procs.iter().find(|p| p.name == "trainer") {
        terminate(t);
    }
    let mut outcome = outcome;
    for p in procs.iter_mut().filter(|p| p.name == "trainer") {
        let status = tokio::time::timeout(Duration::from_secs(120), p.child.wait()).await;
        // A trainer that fails as it stops (its last checkpoint) is a failure of the run.
        if let (Ok(Ok(status)), true) = (status, outcome.is_ok()) {
            let stopped = status.success() || status.code() == Some(crate::EXIT_STOPPED);
            if !stopped && status.code().is_some() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                outcome = Err(anyhow::anyhow!(
                    "the trainer failed as it stopped ({status}){}",
                    last_error(p, &dir)
                ));
            }
        }
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
        .and_then(|s| serde_json::from_str(s.lines().last().unwrap_or_default()).ok());
    let steps = trainer_report
        .as_ref()
        .and_then(|r| r["steps"].as_u64())
        .or_else(|| last_line(&dir.join("trainer.metrics.jsonl")).and_then(|l| l["step"].as_u64()))
        .unwrap_or(0);
    let summary = json!({
        "run_id": run_id,
        "run_dir": dir,
        "wall_seconds": started.elapsed().as_secs_f64(),
        "selector_restarts": restarts,
        "interrupted": interrupted,
        "failed": outcome.as_ref().err().map(|e| format!("{e:#}")),
        "steps": steps,
        "configs": procs.iter().map(|p| p.config.clone()).collect::<Vec<_>>(),
        "trainer": trainer_report,
        "loader": last_line(&dir.join("loader.metrics.jsonl")),
    });
    // The run's own failure is what the user needs first; a summary that cannot be written
    // (a full disk) is said after it, never in its place.
    let written = rho_protocol::jsonl::write_atomic(
        &dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    );
    if let Err(e) = &written {
        tracing::warn!("cannot write the run's summary: {e}");
    }
    outcome?;
    written.map_err(|e| anyhow::anyhow!("writing the summary: {e}"))?;
    if interrupted {
        say(&format!(
            "rho run `{run_id}` stopped at step {steps} after {:.1} s (interrupted); run the same command to resume; summary in {}",
            started.elapsed().as_secs_f64(),
            dir.join("summary.json").display()
        ));
        return Ok(RunEnd::Stopped);
    }
    say(&format!(
        "rho run `{run_id}` finished: {steps} steps in {:.1} s; summary in {}",
        started.elapsed().as_secs_f64(),
        dir.join("summary.json").display()
    ));
    {
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "{}", serde_json::to_string(&summary)?);
    }
    Ok(RunEnd::Finished)
}

/// What one look at the processes found.
enum Watch {
    Running,
    Finished,
    Stopped,
}

/// Looks at every process once: the end of the run, a failure, a selector to restart (with
/// backoff) or to give up on.
async fn watch(
    procs: &mut [Proc],
    dir: &Path,
    exe: &Path,
    rc: &RunConfig,
    selector: Option<&SelectorConfig>,
    restarts: &mut u64,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Watch> {
    let mut loader_alive = true;
    for p in procs.iter_mut().filter(|p| !p.name.starts_with("selector")) {
        let Some(status) = p.child.try_wait()? else {
            continue;
        };
        if !status.success() {
            // Let the log copy catch up with the last lines.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if p.name == "loader" {
            loader_alive = false;
            if !status.success() {
                bail!("the loader failed ({status}){}", last_error(p, dir));
            }
        } else if p.name == "trainer" {
            if status.success() {
                return Ok(Watch::Finished);
            }
            if status.code() == Some(crate::EXIT_STOPPED) {
                return Ok(Watch::Stopped);
            }
            bail!("the trainer failed ({status}){}", last_error(p, dir));
        }
    }
    let Some(s) = selector else {
        return Ok(Watch::Running);
    };
    for p in procs
        .iter_mut()
        .filter(|p| p.name.starts_with("selector") && !p.done)
    {
        watch_selector(p, dir, exe, rc, s, loader_alive, restarts, progress).await?;
    }
    let mut selectors = procs.iter().filter(|p| p.name.starts_with("selector"));
    if loader_alive && selectors.all(|p| p.failed) {
        bail!(
            "every selector has exited and none is restarted (`restart_selectors` is false): the trainer cannot get scored batches; see the selector logs in {}",
            dir.display()
        );
    }
    Ok(Watch::Running)
}

/// One look at a selector: restart it when its backoff is over, notice that it exited, and
/// decide whether it is restarted (with backoff), given up on, or the run ends.
#[allow(clippy::too_many_arguments)]
async fn watch_selector(
    p: &mut Proc,
    dir: &Path,
    exe: &Path,
    rc: &RunConfig,
    config: &SelectorConfig,
    loader_alive: bool,
    restarts: &mut u64,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<()> {
    let now = Instant::now();
    let name = p.name.clone();
    if let Some(at) = p.restart_at {
        if now >= at {
            *restarts += 1;
            let mut c = config.clone();
            c.metrics = Some(dir.join(format!("{name}.metrics.jsonl")));
            let log = dir.join(format!("{name}.log"));
            let _ = std::fs::rename(&log, dir.join(format!("{name}.{restarts}.log")));
            let failures = p.quick_failures;
            *p = start(exe, dir, &name, "selector", &serde_json::to_value(&c)?)?;
            p.quick_failures = failures;
        }
        return Ok(());
    }
    let Some(status) = p.child.try_wait()? else {
        // Alive long enough: its earlier failures were not a pattern.
        if p.started.elapsed() > SHORT_LIFE {
            p.quick_failures = 0;
        }
        return Ok(());
    };
    if status.success() || !loader_alive {
        p.done = true;
        return Ok(());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let why = last_error(p, dir);
    if !rc.restart_selectors {
        p.done = true;
        p.failed = true;
        progress.suspend(|| {
            tracing::warn!(selector = %name, %status, "selector exited and is not restarted (`restart_selectors` is false){why}")
        });
        return Ok(());
    }
    p.quick_failures = if p.started.elapsed() < SHORT_LIFE {
        p.quick_failures + 1
    } else {
        1
    };
    let failures = p.quick_failures;
    if failures >= rc.max_selector_failures {
        bail!(
            "{name} failed {failures} times in a row, each within {} s of its start ({status}){why}",
            SHORT_LIFE.as_secs()
        );
    }
    let backoff = FIRST_BACKOFF
        .saturating_mul(1 << (failures - 1).min(16))
        .min(MAX_BACKOFF);
    progress.suspend(|| {
        tracing::warn!(selector = %name, %status, "selector died; restarting it in {:.1} s{why}", backoff.as_secs_f64())
    });
    p.restart_at = Some(now + backoff);
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
        // The run dies with this process, as a run's processes die with `rho run`.
        .env(SUPERVISOR_PID_VAR, std::process::id().to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_run_config_field_is_in_the_config_reference() {
        let rc: RunConfig = serde_json::from_value(json!({
            "run_dir": "r", "loader": {}, "trainer": {}, "selector": {}
        }))
        .unwrap();
        let doc =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/CONFIG.md"))
                .unwrap();
        let section = &doc[doc.find("## Run").unwrap()..];
        let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
        let listed: Vec<&str> = section
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .collect();
        let fields: Vec<String> = serde_json::to_value(&rc)
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        for f in &fields {
            assert!(
                listed.contains(&f.as_str()),
                "docs/CONFIG.md, Run: `{f}` not documented"
            );
        }
        for l in &listed {
            assert!(
                fields.iter().any(|f| f == l),
                "docs/CONFIG.md, Run: no field `{l}`"
            );
        }
    }

    #[test]
    fn color_codes_are_stripped_from_a_logged_error() {
        assert_eq!(strip_ansi("\u{1b}[31mERROR\u{1b}[0m boom"), "ERROR boom");
    }
}
