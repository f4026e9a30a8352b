//! What every `rho` process shares at run time: logging, the allocator's settings, CPU threads,
//! stopping on signals (or when the supervisor is gone), reports on stdout, the exit status of
//! a stopped process, loading a tokenizer, and the typed configs the demo and the benchmarks
//! build.

use anyhow::Context;

/// The environment variable through which a child of `rho run` learns its supervisor's pid
/// (it stops when its parent is no longer that process).
pub const SUPERVISOR_PID_VAR: &str = "RHO_SUPERVISOR_PID";

/// The exit status of a process stopped by a signal before its work was done (128 + SIGINT),
/// so that scripts can tell it from a finished one.
pub const EXIT_STOPPED: i32 = 130;

/// Loads a `tokenizer.json` as every rho process does: its own padding and truncation off.
pub fn load_tokenizer(path: &std::path::Path) -> anyhow::Result<tokenizers::Tokenizer> {
    rho_common::tokenizer::load(path)
        .map(|t| t.tokenizer)
        .map_err(|e| anyhow::anyhow!("tokenizer {}: {e}", path.display()))
}

/// A loader of `seq_len` x `batch_size` batches of these shards, tokenized by `tokenizer`, every
/// other field at its default; an error names the size that is 0.
pub fn loader_config(
    paths: Vec<String>,
    tokenizer: &std::path::Path,
    seq_len: usize,
    batch_size: usize,
) -> anyhow::Result<rho_loader::LoaderConfig> {
    let nonzero = |n, what| std::num::NonZeroUsize::new(n).with_context(|| format!("{what} is 0"));
    Ok(rho_loader::LoaderConfig::new(
        rho_loader::DataConfig::new(paths),
        tokenizer.to_path_buf(),
        nonzero(seq_len, "the sequence length")?,
        nonzero(batch_size, "the batch size")?,
    ))
}

/// An endpoint from its text, or the reason it is not one, naming it.
pub fn endpoint(at: &str) -> anyhow::Result<rho_protocol::Endpoint> {
    rho_protocol::Endpoint::new(at).map_err(|e| anyhow::anyhow!("endpoint `{at}`: {e}"))
}

/// Resolves on Ctrl-C, SIGTERM or SIGHUP (a closed terminal), or when the supervisor that
/// started this process is gone.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let unix = async {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(mut term), Ok(mut hup)) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = hup.recv() => {},
                }
            }
            _ => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let unix = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = unix => {},
        _ = supervisor_gone() => {},
    }
}

/// A process started by `rho run` dies with it: `rho run` puts its pid in `RHO_SUPERVISOR_PID`,
/// and this resolves as soon as this process's parent is no longer that pid (the supervisor was
/// killed, even by SIGKILL, and this process was handed to another parent). Pending otherwise.
async fn supervisor_gone() {
    #[cfg(unix)]
    if let Some(pid) = std::env::var(SUPERVISOR_PID_VAR)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
    {
        loop {
            if std::os::unix::process::parent_id() != pid {
                tracing::warn!(supervisor = pid, "the supervisor is gone: stopping");
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    std::future::pending::<()>().await
}

/// Prints a process's report on stdout; a stdout that cannot be written (a full disk under
/// `rho run`) is logged, not a panic.
pub fn print_report(report: &impl serde::Serialize) -> anyhow::Result<()> {
    use std::io::Write;
    let line = serde_json::to_string(report)?;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|_| out.flush()) {
        tracing::warn!("cannot write the report to stdout: {e}");
    }
    Ok(())
}

/// Limits model math to `threads` CPU threads: candle's matrix products read
/// `RAYON_NUM_THREADS` and its element-wise kernels run on rayon's global pool.
pub fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    let Some(mut n) = threads else { return Ok(()) };
    if n == 0 {
        anyhow::bail!("`threads` must be at least 1");
    }
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    if n > cores {
        tracing::warn!(
            threads = n,
            cores,
            "`threads` is more than this machine's cores: using {cores}"
        );
        n = cores;
    }
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .context("setting up the thread pool")
}

/// mimalloc's `mi_option_purge_delay` (mimalloc.h, v2).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory instead of returning it to the system: a training step frees and
/// reallocates the same large buffers, and the kernel zeroing fresh pages for them took a fifth
/// of the step's time. A `MIMALLOC_PURGE_DELAY` set in the environment wins.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        #[allow(unsafe_code)]
        // SAFETY: setting a mimalloc option is a plain store into its option table, valid at any time.
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1)
        };
    }
}

/// stderr for the logs, where a failed write is dropped: a log that cannot be written (a full
/// disk, a supervisor gone with the other end of the pipe) never stops a process that can still
/// work. (The stock writer reports the failure with `eprintln!`, which panics.)
pub struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}
