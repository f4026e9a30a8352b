//! One supervised process: its role, the child, its log and the tail of its stderr.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};

use super::placement::Launch;
use crate::runtime::SUPERVISOR_PID_VAR;

/// What a supervised process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Loader,
    Trainer,
    /// The selector with this index.
    Selector(usize),
}

impl Role {
    /// The name of its files in the run directory (`<name>.json`, `.log`, ...).
    pub fn name(self) -> String {
        match self {
            Role::Loader => "loader".into(),
            Role::Trainer => "trainer".into(),
            Role::Selector(i) => format!("selector-{i}"),
        }
    }

    /// The `rho` subcommand that runs it.
    pub fn command(self) -> &'static str {
        match self {
            Role::Loader => "loader",
            Role::Trainer => "trainer",
            Role::Selector(_) => "selector",
        }
    }

    pub fn is_selector(self) -> bool {
        matches!(self, Role::Selector(_))
    }
}

/// What a process wrote to stderr, kept in memory: its last error reaches the terminal even
/// when its log file cannot be written (a full disk).
#[derive(Default)]
struct TailState {
    /// The last lines.
    lines: std::collections::VecDeque<String>,
    /// The last error report: `Error: ...` and its causes, or a panic (`thread '...' panicked
    /// at ...` and its message), up to a backtrace or the hint about one; or an allocation
    /// failure's line (the process aborted).
    error: Vec<String>,
    in_error: bool,
}

impl TailState {
    fn push(&mut self, text: String) {
        let panic = text.starts_with("thread '") && text.contains("panicked at");
        let abort = text.starts_with("memory allocation of");
        if text.starts_with("Error:") || panic || abort {
            self.error.clear();
            self.in_error = true;
        } else if text.starts_with("Stack backtrace:")
            || text.starts_with("stack backtrace:")
            || text.starts_with("note: run with `RUST_BACKTRACE")
            || text.starts_with("note: Some details are omitted")
        {
            self.in_error = false;
        }
        if self.in_error && self.error.len() < ERROR_LINES && !text.trim().is_empty() {
            self.error.push(text.trim().to_string());
        }
        if abort {
            self.in_error = false;
        }
        if self.lines.len() == TAIL_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(text);
    }
}

type Tail = std::sync::Arc<std::sync::Mutex<TailState>>;
const TAIL_LINES: usize = 50;
const ERROR_LINES: usize = 12;

/// A supervised child process.
pub struct Proc {
    pub role: Role,
    pub child: Child,
    tail: Tail,
    /// The config file it was started with.
    pub config: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    pub started: Instant,
    /// Failures in a row, each soon after a start.
    pub quick_failures: u32,
    /// Exited and waiting to be restarted at this moment.
    pub restart_at: Option<Instant>,
    /// Exited for good.
    pub done: bool,
    /// Exited for good after a failure.
    pub failed: bool,
}

/// Writes a file; the error names it.
pub fn write(path: &Path, bytes: impl AsRef<[u8]>) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

impl Proc {
    /// Writes `config` as `dir/<name>.json` and starts `exe <command> --config` on it, placed
    /// by `launch` (`gpu`: the process runs on a GPU): stdout (its report) to
    /// `<name>.report.json`, stderr copied to `<name>.log`, its pid to `<name>.pid`.
    pub fn start(
        exe: &Path,
        dir: &Path,
        role: Role,
        config: &impl serde::Serialize,
        launch: (&Launch, bool),
    ) -> anyhow::Result<Proc> {
        let name = role.name();
        let path = dir.join(format!("{name}.json"));
        write(&path, serde_json::to_string_pretty(config)?)?;
        let (mut command, direct) = launch.0.command(exe, role, &path, launch.1);
        // Errors are reported with their causes; a backtrace would bury them in the log.
        command.env("RUST_LIB_BACKTRACE", "0");
        match direct {
            true => command.env(SUPERVISOR_PID_VAR, std::process::id().to_string()),
            false => command.env_remove(SUPERVISOR_PID_VAR),
        };
        Proc::spawn(command, dir, role, path, "report.json")
    }

    /// Starts a command of the user's (a trainer such as torchrun) as `role`, in `cwd`, with
    /// `env` added: stdout to `<name>.out`, stderr copied to `<name>.log`, its pid to
    /// `<name>.pid`; `config` names the file that describes it.
    pub fn start_command(
        argv: &[String],
        cwd: &Path,
        env: &[(String, String)],
        dir: &Path,
        role: Role,
        config: PathBuf,
    ) -> anyhow::Result<Proc> {
        let Some((program, args)) = argv.split_first() else {
            anyhow::bail!("{}: an empty command", role.name());
        };
        let mut command = Command::new(program);
        command.args(args).current_dir(cwd);
        command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command.env(SUPERVISOR_PID_VAR, std::process::id().to_string());
        Proc::spawn(command, dir, role, config, "out")
            .with_context(|| format!("the trainer command `{}`", argv.join(" ")))
    }

    /// Starts `command` as `role`: stdout to `<name>.<stdout>`, stderr copied to `<name>.log`
    /// (its tail kept for errors), its pid to `<name>.pid`; it dies with the supervisor.
    fn spawn(
        mut command: Command,
        dir: &Path,
        role: Role,
        config: PathBuf,
        stdout: &str,
    ) -> anyhow::Result<Proc> {
        let name = role.name();
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let out_path = dir.join(format!("{name}.{stdout}"));
        let out = std::fs::File::create(&out_path)
            .with_context(|| format!("creating {}", out_path.display()))?;
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        let mut child = command
            .env("RUST_LOG", rust_log)
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let tail = Tail::default();
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(copy_log(stderr, log, log_path.clone(), tail.clone()));
        }
        if let Some(pid) = child.id() {
            write(&dir.join(format!("{name}.pid")), pid.to_string())?;
        }
        Ok(Proc {
            role,
            child,
            tail,
            config,
            log: log_path,
            started: Instant::now(),
            quick_failures: 0,
            restart_at: None,
            done: false,
            failed: false,
        })
    }

    pub fn name(&self) -> String {
        self.role.name()
    }

    /// Sends SIGTERM (a graceful stop).
    pub fn terminate(&self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }

    /// Waits until the copy of its stderr has caught up with its last lines (the pipe closed,
    /// or a moment passed).
    pub async fn settle(&self) {
        let deadline = Instant::now() + Duration::from_millis(500);
        while std::sync::Arc::strong_count(&self.tail) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The last error it reported (`Error: ...` and its causes), else its last logged error or
    /// line, as `": <text> (see <log>)"`, or a pointer to its log.
    pub fn last_error(&self) -> String {
        let (error, lines) = self
            .tail
            .lock()
            .map(|t| (t.error.clone(), t.lines.iter().cloned().collect::<Vec<_>>()))
            .unwrap_or_default();
        let text = if !error.is_empty() {
            let causes: Vec<&str> = error
                .iter()
                .filter(|l| *l != "Caused by:")
                .map(String::as_str)
                .collect();
            Some(causes.join(" "))
        } else {
            lines
                .iter()
                .rev()
                .find(|l| l.contains("ERROR"))
                .or_else(|| lines.iter().rev().find(|l| !l.trim().is_empty()))
                .map(|l| l.trim().to_string())
        };
        match text {
            Some(t) => format!(": {t} (see {})", self.log.display()),
            None => format!("; see {}", self.log.display()),
        }
    }
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
            t.push(text);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn color_codes_are_stripped_from_a_logged_error() {
        assert_eq!(strip_ansi("\u{1b}[31mERROR\u{1b}[0m boom"), "ERROR boom");
    }

    #[test]
    fn the_last_error_report_is_kept_with_its_causes() {
        let mut t = TailState::default();
        for l in [
            "INFO start",
            "Error: first",
            "Error: model",
            "",
            "Caused by:",
            "  bad file",
        ] {
            t.push(l.to_string());
        }
        assert_eq!(t.error, vec!["Error: model", "Caused by:", "bad file"]);
        t.push("Stack backtrace:".into());
        t.push("  0: frame".into());
        assert_eq!(t.error.len(), 3);
        assert_eq!(t.lines.len(), 8);
    }

    #[test]
    fn a_panic_is_kept_with_its_message_and_without_the_backtrace_hint() {
        let mut t = TailState::default();
        for l in [
            "INFO step 3",
            "thread 'main' panicked at vendor/candle-core/src/backprop.rs:175:18:",
            "candle internal error - grad not populated",
            "note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace",
        ] {
            t.push(l.to_string());
        }
        assert_eq!(
            t.error,
            vec![
                "thread 'main' panicked at vendor/candle-core/src/backprop.rs:175:18:",
                "candle internal error - grad not populated"
            ]
        );
        let mut t = TailState::default();
        for l in [
            "thread 'w' panicked at src/x.rs:1:1:",
            "boom",
            "stack backtrace:",
            "   0: frame",
            "note: Some details are omitted, run with `RUST_BACKTRACE=full` for a verbose backtrace.",
        ] {
            t.push(l.to_string());
        }
        assert_eq!(
            t.error,
            vec!["thread 'w' panicked at src/x.rs:1:1:", "boom"]
        );
        let mut t = TailState::default();
        t.push("memory allocation of 4611686018427453449 bytes failed".into());
        t.push("".into());
        assert_eq!(
            t.error,
            vec!["memory allocation of 4611686018427453449 bytes failed"]
        );
    }

    #[test]
    fn roles_name_their_files_and_commands() {
        assert_eq!(Role::Selector(2).name(), "selector-2");
        assert_eq!(Role::Selector(2).command(), "selector");
        assert_eq!(Role::Trainer.name(), "trainer");
        assert!(!Role::Loader.is_selector());
    }
}
