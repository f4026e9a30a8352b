//! `rho run FILE`: a whole pipeline on one machine, as child processes, supervised.
//!
//! The run config holds the three process configs (without the endpoints they connect to,
//! which the supervisor assigns on loopback) and the number of selectors. The supervisor writes
//! each process's config into the run directory, starts the loader, the trainer and the
//! selectors, restarts a selector that dies, shows one progress line for the run, and on Ctrl-C
//! or SIGTERM stops the trainer first (it checkpoints) and then the rest. Everything stays in the
//! run directory: configs, logs, metrics, reports, checkpoints, and the run's fresh secret, with
//! which every message is signed (unless a section names its own `secret_file`).
//!
//! - [`config`]: the run config, completed and checked before anything starts;
//! - [`child`]: one supervised process, its log and its last error;
//! - [`mod@launch`]: running a whole `rho run` from another command (the demo, the benchmarks);
//! - this module: the [`Supervisor`], one method per event.

pub mod child;
pub mod config;
pub mod launch;
pub mod placement;
pub mod summary;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rho_loader::metrics::LoaderMetrics;
use rho_selector::SelectorConfig;
use rho_trainer::StepMetrics;

use child::{write, Proc, Role};
use config::{Plan, Trainer};
pub use summary::Summary;

pub use launch::{launch, RunOutcome};

/// A selector that dies sooner than this after its start failed "at once": repeated, it is a
/// configuration error, not bad luck.
const SHORT_LIFE: Duration = Duration::from_secs(30);
/// The first restart waits this long, each further one twice as long, up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How a supervised run ended (errors aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// The stream ended, or the trainer's `max_steps`.
    Finished,
    /// Stopped by a signal before that; the run resumes from its checkpoint when run again.
    Stopped,
}

/// A line for the person at the terminal; a terminal that is gone is not an error.
fn say(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// Runs the run config `file` to its end, or until `shutdown` resolves.
pub async fn run(
    file: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<RunEnd> {
    let started = Instant::now();
    // One owner per run directory: held until this process exits, however it exits. The run
    // directory is created by reading the plan; nothing else is written before it is held.
    let plan = Plan::load(file)?;
    let _owner = rho_common::lock::DirLock::acquire(&plan.dir)?;
    plan.check()?;
    let mut supervisor = Supervisor::start(plan, started).await?;
    let outcome = supervisor.watch_until_end(shutdown).await;
    let outcome = supervisor.stop(outcome).await;
    supervisor.finish(outcome)
}

/// A supervised run: its processes and what happened to them. Each event of the loop in
/// [`Supervisor::watch_until_end`] is one method.
pub struct Supervisor {
    plan: Plan,
    run_id: String,
    exe: PathBuf,
    procs: Vec<Proc>,
    /// The selectors' config with every endpoint assigned.
    selector: Option<SelectorConfig>,
    restarts: u64,
    interrupted: bool,
    progress: indicatif::ProgressBar,
    started: Instant,
}

/// What one look at the processes found.
enum Watch {
    Running,
    Finished,
    Stopped,
}

impl Supervisor {
    /// Keeps an earlier attempt's files, writes the run's secret, and starts the loader, the
    /// trainer and the selectors in that order, each once the endpoint it needs is known.
    async fn start(mut plan: Plan, started: Instant) -> anyhow::Result<Supervisor> {
        let dir = plan.dir.clone();
        if let Some(kept) = keep_earlier_attempt(&dir)? {
            say(&format!(
                "kept the earlier attempt's logs, metrics and reports in {}",
                kept.display()
            ));
        }
        write(&dir.join("run.json"), &plan.text)?;
        let secret = new_secret(&dir)?;
        let loader = &mut plan.settings.loader;
        loader.secret_file.get_or_insert_with(|| secret.clone());
        let run_id = loader.run_id.clone();
        let mut s = Supervisor {
            run_id,
            exe: std::env::current_exe()?,
            procs: Vec::new(),
            selector: None,
            restarts: 0,
            interrupted: false,
            progress: indicatif::ProgressBar::new_spinner(),
            started,
            plan,
        };
        let loader_at = s.start_loader().await?;
        match s.plan.trainer() {
            Trainer::Candle(_) => s.start_trainer(&loader_at, &secret).await?,
            Trainer::Command(_) => s.start_command(&loader_at, &secret)?,
        }
        s.start_selectors(&loader_at, &secret).await?;
        say(&format!(
            "rho run `{}`: loader on {loader_at}, {} rank(s), {} selector(s), run directory {}",
            s.run_id,
            s.plan.ranks(),
            s.plan.selectors(),
            dir.display()
        ));
        Ok(s)
    }

    fn dir(&self) -> &Path {
        &self.plan.dir
    }

    /// Rank `rank`'s file `rank-<rank>.<what>` in the run directory (`{rank}` in the
    /// environment of a trainer command, which each rank fills in).
    fn rank_file(&self, rank: impl std::fmt::Display, what: &str) -> PathBuf {
        self.dir().join(format!("rank-{rank}.{what}"))
    }

    /// Starts the loader; its bound endpoint.
    async fn start_loader(&mut self) -> anyhow::Result<String> {
        let file = self.dir().join("loader.endpoint");
        let _ = std::fs::remove_file(&file);
        let loader = &self.plan.settings.loader;
        loader.validate().context("run config, section `loader`")?;
        let launch = (&self.plan.settings.launch, false);
        self.procs.push(Proc::start(
            &self.exe,
            &self.plan.dir,
            Role::Loader,
            loader,
            launch,
        )?);
        self.wait_file(&file).await
    }

    /// Starts the trainer, once a trainer of an earlier attempt has let go of the checkpoints.
    async fn start_trainer(&mut self, loader_at: &str, secret: &Path) -> anyhow::Result<()> {
        let Some(trainer) = self.plan.settings.trainer.as_mut() else {
            return Ok(());
        };
        trainer.run_id = self.run_id.clone();
        trainer.loader = endpoint(loader_at)?;
        trainer
            .secret_file
            .get_or_insert_with(|| secret.to_path_buf());
        trainer
            .validate()
            .context("run config, section `trainer`")?;
        if let Some(ck) = &trainer.checkpoint {
            wait_for_owner(&ck.dir, Duration::from_secs(120)).await?;
        }
        let _ = std::fs::remove_file(self.plan.dir.join("trainer.delivery"));
        let launch = &self.plan.settings.launch;
        let Some(trainer) = self.plan.settings.trainer.as_mut() else {
            return Ok(());
        };
        let gpu = trainer.device != rho_model::DeviceSpec::Cpu;
        trainer.device = launch.device_in_step(trainer.device);
        self.procs.push(Proc::start(
            &self.exe,
            &self.plan.dir,
            Role::Trainer,
            &*trainer,
            (launch, gpu),
        )?);
        Ok(())
    }

    /// Starts the trainer command once, in the run config's directory, with each rank's
    /// stream described in the environment (docs/SCALING.md, "Environment").
    fn start_command(&mut self, loader_at: &str, secret: &Path) -> anyhow::Result<()> {
        let Trainer::Command(c) = self.plan.trainer() else {
            return Ok(());
        };
        let dir = self.dir();
        for r in 0..c.ranks.get() {
            let _ = std::fs::remove_file(self.rank_file(r, "delivery"));
        }
        let file = |what: &str| self.rank_file("{rank}", what).display().to_string();
        let mut env = vec![
            ("RHO_LOADER".to_string(), loader_at.to_string()),
            ("RHO_RUN_ID".into(), self.run_id.clone()),
            ("RHO_RUN_DIR".into(), dir.display().to_string()),
            ("RHO_RANKS".into(), c.ranks.to_string()),
            ("RHO_SCORED".into(), if c.scored { "1" } else { "0" }.into()),
            (
                "RHO_DELIVERY".into(),
                self.plan.settings.launch.default_bind().into(),
            ),
            ("RHO_DELIVERY_FILE".into(), file("delivery")),
            ("RHO_METRICS".into(), file("metrics.jsonl")),
            ("RHO_SECRET_FILE".into(), secret.display().to_string()),
        ];
        env.extend(c.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let described = dir.join("trainer.json");
        write(&described, serde_json::to_string_pretty(c)?)?;
        let proc = Proc::start_command(
            &c.command,
            &self.plan.base,
            &env,
            dir,
            Role::Trainer,
            described,
        )?;
        self.procs.push(proc);
        Ok(())
    }

    /// The delivery endpoint of every rank, by rank, once each has published it: the candle
    /// trainer's, or each rank's of a trainer command.
    async fn deliveries(&mut self) -> anyhow::Result<Vec<rho_protocol::Endpoint>> {
        let files: Vec<PathBuf> = match self.plan.trainer() {
            Trainer::Candle(_) => vec![self.dir().join("trainer.delivery")],
            Trainer::Command(c) => (0..c.ranks.get())
                .map(|r| self.rank_file(r, "delivery"))
                .collect(),
        };
        let mut out = Vec::with_capacity(files.len());
        for f in files {
            out.push(endpoint(&self.wait_file(&f).await?)?);
        }
        Ok(out)
    }

    /// Starts the selectors, once every rank's delivery endpoint is known.
    async fn start_selectors(&mut self, loader_at: &str, secret: &Path) -> anyhow::Result<()> {
        let Some(mut s) = self.plan.selector.clone() else {
            return Ok(());
        };
        let mut deliveries = self.deliveries().await?;
        if deliveries.len() == 1 {
            s.trainer = deliveries.remove(0);
        } else {
            s.trainers = deliveries;
        }
        s.run_id = self.run_id.clone();
        s.loader = endpoint(loader_at)?;
        s.secret_file.get_or_insert_with(|| secret.to_path_buf());
        s.validate().context("run config, section `selector`")?;
        for i in 0..self.plan.selectors() {
            let p = self.start_selector(&s, i)?;
            self.procs.push(p);
        }
        self.selector = Some(s);
        Ok(())
    }

    fn start_selector(&self, config: &SelectorConfig, i: usize) -> anyhow::Result<Proc> {
        let role = Role::Selector(i);
        let mut c = config.clone();
        let launch = &self.plan.settings.launch;
        let device = self.plan.settings.selector_device(i, config);
        c.device = launch.device_in_step(device);
        c.metrics = Some(self.dir().join(format!("{}.metrics.jsonl", role.name())));
        c.tensorboard = Some(self.dir().join("tensorboard").join(role.name()));
        let gpu = device != rho_model::DeviceSpec::Cpu;
        Proc::start(&self.exe, self.dir(), role, &c, (launch, gpu))
    }

    /// Waits for a process to write an endpoint file; an error when a process exits first.
    async fn wait_file(&mut self, path: &Path) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(s) = std::fs::read_to_string(path).ok().filter(|s| !s.is_empty()) {
                return Ok(s.trim().to_string());
            }
            for p in self.procs.iter_mut() {
                if let Some(status) = p.child.try_wait()? {
                    p.settle().await;
                    bail!(
                        "{} exited during start-up ({status}){}",
                        p.name(),
                        p.last_error()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("{} did not appear", path.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Looks at the processes twice a second until the run ends, fails, or `shutdown` resolves.
    async fn watch_until_end(
        &mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    self.interrupted = true;
                    return Ok(());
                }
                _ = tick.tick() => {}
            }
            match self.watch().await? {
                Watch::Running => self.show_progress(),
                Watch::Finished => return Ok(()),
                Watch::Stopped => {
                    self.interrupted = true;
                    return Ok(());
                }
            }
        }
    }

    /// Each rank's last progress line, by rank (a trainer command's; none for the candle
    /// trainer).
    fn rank_progress(&self) -> Vec<Option<summary::RankProgress>> {
        let Trainer::Command(c) = self.plan.trainer() else {
            return Vec::new();
        };
        (0..c.ranks.get())
            .map(|r| rho_common::jsonl::read_last(&self.rank_file(r, "metrics.jsonl")))
            .collect()
    }

    fn show_progress(&self) {
        let dir = self.dir();
        let ranks = self.rank_progress();
        if !ranks.is_empty() {
            return self.show_rank_progress(&ranks);
        }
        let t: Option<StepMetrics> =
            rho_common::jsonl::read_last(&dir.join("trainer.metrics.jsonl"));
        let l: Option<LoaderMetrics> =
            rho_common::jsonl::read_last(&dir.join("loader.metrics.jsonl"));
        let (t, l) = (t.unwrap_or_default(), l.unwrap_or_default());
        let alive = self
            .procs
            .iter()
            .filter(|p| p.role.is_selector() && p.restart_at.is_none() && !p.done)
            .count();
        self.progress.set_message(format!(
            "run {}: step {} | {:.0} tok/s | selectors alive {alive} (restarts {}) | in flight {} | redeliveries {} | waiting for data {:.0}%",
            self.run_id, t.step, t.tokens_per_s, self.restarts, l.counts.in_flight, l.counts.redeliveries, t.data_wait_fraction * 100.0
        ));
        self.progress.tick();
    }

    /// The progress line of a trainer command's ranks: each rank's batches.
    fn show_rank_progress(&self, ranks: &[Option<summary::RankProgress>]) {
        let l: Option<LoaderMetrics> =
            rho_common::jsonl::read_last(&self.dir().join("loader.metrics.jsonl"));
        let l = l.unwrap_or_default();
        let batches: Vec<String> = ranks
            .iter()
            .map(|r| r.as_ref().map_or("-".into(), |r| r.batches.to_string()))
            .collect();
        let wait = ranks
            .iter()
            .flatten()
            .map(|r| r.data_wait_fraction)
            .fold(0f64, f64::max);
        self.progress.set_message(format!(
            "run {}: batches by rank {} | selectors restarts {} | in flight {} | redeliveries {} | waiting for data up to {:.0}%",
            self.run_id, batches.join("/"), self.restarts, l.counts.in_flight, l.counts.redeliveries, wait * 100.0
        ));
        self.progress.tick();
    }

    /// Looks at every process once: the end of the run, a failure, a selector to restart (with
    /// backoff) or to give up on.
    async fn watch(&mut self) -> anyhow::Result<Watch> {
        let mut loader_alive = true;
        for p in self.procs.iter_mut().filter(|p| !p.role.is_selector()) {
            let Some(status) = p.child.try_wait()? else {
                continue;
            };
            p.settle().await;
            match p.role {
                Role::Loader if status.success() => loader_alive = false,
                Role::Loader => bail!("the loader failed ({status}){}", p.last_error()),
                _ if status.success() => return Ok(Watch::Finished),
                _ if status.code() == Some(crate::runtime::EXIT_STOPPED) => {
                    return Ok(Watch::Stopped)
                }
                _ => bail!("the trainer failed ({status}){}", p.last_error()),
            }
        }
        if self.selector.is_none() {
            return Ok(Watch::Running);
        }
        for i in 0..self.procs.len() {
            if self.procs[i].role.is_selector() && !self.procs[i].done {
                self.watch_selector(i, loader_alive).await?;
            }
        }
        let mut selectors = self.procs.iter().filter(|p| p.role.is_selector());
        if loader_alive && selectors.all(|p| p.failed) {
            bail!(
                "every selector has exited and none is restarted (`restart_selectors` is false): the trainer cannot get scored batches; see the selector logs in {}",
                self.dir().display()
            );
        }
        Ok(Watch::Running)
    }

    /// One look at selector `i`: restart it when its backoff is over, notice that it exited,
    /// and decide whether it is restarted (with backoff), given up on, or the run ends.
    async fn watch_selector(&mut self, i: usize, loader_alive: bool) -> anyhow::Result<()> {
        if self.procs[i].restart_at.is_some() {
            return self.restart_when_due(i);
        }
        let p = &mut self.procs[i];
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
        p.settle().await;
        let (name, why) = (p.name(), p.last_error());
        if !self.plan.settings.restart_selectors {
            (p.done, p.failed) = (true, true);
            self.progress.suspend(|| {
                tracing::warn!(selector = %name, %status, "selector exited and is not restarted (`restart_selectors` is false){why}")
            });
            return Ok(());
        }
        p.quick_failures = match p.started.elapsed() < SHORT_LIFE {
            true => p.quick_failures + 1,
            false => 1,
        };
        let failures = p.quick_failures;
        if failures >= self.plan.settings.max_selector_failures {
            bail!(
                "{name} failed {failures} times in a row, each within {} s of its start ({status}){why}",
                SHORT_LIFE.as_secs()
            );
        }
        let backoff = backoff(failures);
        self.progress.suspend(|| {
            tracing::warn!(selector = %name, %status, "selector died; restarting it in {:.1} s{why}", backoff.as_secs_f64())
        });
        self.procs[i].restart_at = Some(Instant::now() + backoff);
        Ok(())
    }

    /// Restarts selector `i` once its backoff is over (its log of the failed attempt kept).
    fn restart_when_due(&mut self, i: usize) -> anyhow::Result<()> {
        let (Some(at), Role::Selector(n)) = (self.procs[i].restart_at, self.procs[i].role) else {
            return Ok(());
        };
        let Some(config) = self.selector.as_ref().filter(|_| Instant::now() >= at) else {
            return Ok(());
        };
        self.restarts += 1;
        let log = &self.procs[i].log;
        let kept = self
            .plan
            .dir
            .join(format!("selector-{n}.{}.log", self.restarts));
        let _ = std::fs::rename(log, kept);
        let failures = self.procs[i].quick_failures;
        self.procs[i] = self.start_selector(config, n)?;
        self.procs[i].quick_failures = failures;
        Ok(())
    }

    /// Stops the trainer first (it checkpoints on SIGTERM), then whatever still runs. A trainer
    /// that fails as it stops (its last checkpoint) is a failure of the run.
    async fn stop(&mut self, outcome: anyhow::Result<()>) -> anyhow::Result<()> {
        self.progress.finish_and_clear();
        if self.interrupted {
            say(&format!(
                "rho run `{}`: stopping (the trainer checkpoints first)",
                self.run_id
            ));
        }
        let mut outcome = outcome;
        // How a command of the user's answers SIGTERM (torchrun forwards it to the ranks) is its
        // own: only the candle trainer's exit status on a stop is judged.
        let judged = matches!(self.plan.trainer(), Trainer::Candle(_));
        for p in self.procs.iter_mut().filter(|p| p.role == Role::Trainer) {
            p.terminate();
            let status = tokio::time::timeout(Duration::from_secs(120), p.child.wait()).await;
            if let (Ok(Ok(status)), true) = (status, outcome.is_ok() && judged) {
                let stopped =
                    status.success() || status.code() == Some(crate::runtime::EXIT_STOPPED);
                if !stopped && status.code().is_some() {
                    p.settle().await;
                    let why = p.last_error();
                    outcome = Err(anyhow::anyhow!(
                        "the trainer failed as it stopped ({status}){why}"
                    ));
                }
            }
        }
        for p in self.procs.iter().filter(|p| p.role != Role::Trainer) {
            p.terminate();
        }
        for p in self.procs.iter_mut() {
            let wait = tokio::time::timeout(Duration::from_secs(10), p.child.wait());
            if wait.await.is_err() {
                let _ = p.child.kill().await;
            }
        }
        outcome
    }

    fn summary(&self, outcome: &anyhow::Result<()>) -> Summary {
        let dir = self.dir();
        let trainer: Option<rho_trainer::Report> =
            rho_common::jsonl::read_last(&dir.join("trainer.report.json"));
        let last_step =
            || rho_common::jsonl::read_last::<StepMetrics>(&dir.join("trainer.metrics.jsonl"));
        let ranks = self.rank_progress();
        // A data-parallel step takes one batch on every rank: the ranks' smallest count.
        let rank_steps = || {
            let counts = ranks.iter().map(|r| r.as_ref().map_or(0, |r| r.batches));
            (!ranks.is_empty()).then(|| counts.min().unwrap_or(0))
        };
        let steps = trainer
            .as_ref()
            .map(|r| r.steps)
            .or_else(|| last_step().map(|l| l.step))
            .or_else(rank_steps)
            .unwrap_or(0);
        Summary {
            run_id: self.run_id.clone(),
            run_dir: dir.to_path_buf(),
            wall_seconds: self.started.elapsed().as_secs_f64(),
            selector_restarts: self.restarts,
            interrupted: self.interrupted,
            failed: outcome.as_ref().err().map(|e| format!("{e:#}")),
            steps,
            configs: self.procs.iter().map(|p| p.config.clone()).collect(),
            trainer,
            loader: rho_common::jsonl::read_last(&dir.join("loader.metrics.jsonl")),
            ranks,
        }
    }

    /// Writes the summary and says how the run ended. The run's own failure is what the user
    /// needs first; a summary that cannot be written (a full disk) is said after it, never in
    /// its place.
    fn finish(self, outcome: anyhow::Result<()>) -> anyhow::Result<RunEnd> {
        let summary = self.summary(&outcome);
        let path = self.dir().join("summary.json");
        let written = rho_common::jsonl::write_atomic(
            &path,
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        );
        if let Err(e) = &written {
            tracing::warn!("cannot write the run's summary: {e}");
        }
        outcome?;
        written.map_err(|e| anyhow::anyhow!("writing the summary: {e}"))?;
        let (run_id, steps, secs) = (&self.run_id, summary.steps, summary.wall_seconds);
        if self.interrupted {
            say(&format!(
                "rho run `{run_id}` stopped at step {steps} after {secs:.1} s (interrupted); run the same command to resume; summary in {}",
                path.display()
            ));
            return Ok(RunEnd::Stopped);
        }
        say(&format!(
            "rho run `{run_id}` finished: {steps} steps in {secs:.1} s; summary in {}",
            path.display()
        ));
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "{}", serde_json::to_string(&summary)?);
        Ok(RunEnd::Finished)
    }
}

/// An endpoint a process published.
fn endpoint(text: &str) -> anyhow::Result<rho_protocol::Endpoint> {
    rho_protocol::Endpoint::new(text).map_err(|e| anyhow::anyhow!("a published endpoint: {e}"))
}

/// The wait before restarting a selector after `failures` quick failures in a row.
fn backoff(failures: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
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

/// Waits until no other process holds `dir` (a trainer of an earlier supervisor finishing its
/// last checkpoint), for at most `limit`.
async fn wait_for_owner(dir: &Path, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut said = false;
    loop {
        match rho_common::lock::DirLock::acquire(dir) {
            Ok(_) => return Ok(()),
            Err(e @ rho_common::lock::LockError::Io { .. }) => return Err(e.into()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_doubling_up_to_a_limit() {
        assert_eq!(backoff(1), FIRST_BACKOFF);
        assert_eq!(backoff(2), FIRST_BACKOFF * 2);
        assert_eq!(backoff(4), FIRST_BACKOFF * 8);
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    #[test]
    fn an_earlier_attempts_files_are_kept_apart() {
        let d = tempfile::tempdir().unwrap();
        assert!(keep_earlier_attempt(d.path()).unwrap().is_none());
        for f in [
            "trainer.log",
            "summary.json",
            "loader.metrics.jsonl",
            "secret",
        ] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        let kept = keep_earlier_attempt(d.path()).unwrap().unwrap();
        assert_eq!(kept, d.path().join("attempts/1"));
        assert!(kept.join("trainer.log").is_file() && kept.join("summary.json").is_file());
        assert!(d.path().join("secret").is_file(), "the secret stays");
        std::fs::write(d.path().join("trainer.log"), "y").unwrap();
        assert_eq!(
            keep_earlier_attempt(d.path()).unwrap().unwrap(),
            d.path().join("attempts/2")
        );
    }

    #[test]
    fn a_summary_reads_back_as_written() {
        let s = Summary {
            run_id: "r".into(),
            run_dir: "/x".into(),
            wall_seconds: 1.5,
            selector_restarts: 2,
            interrupted: false,
            failed: None,
            steps: 7,
            configs: vec!["/x/loader.json".into()],
            trainer: Some(rho_trainer::Report {
                steps: 7,
                ..Default::default()
            }),
            loader: Some(LoaderMetrics::default()),
            ranks: vec![Some(summary::RankProgress::default()), None],
        };
        let back: Summary = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back.trainer.unwrap().steps, 7);
        assert_eq!(back.steps, 7);
    }
}
