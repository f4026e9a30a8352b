//! Metrics files: JSON lines that are whole or absent, and whose failure never stops a process.
//!
//! A process that can still train must not die because its metrics cannot be written (a full
//! disk, a read-only directory), and a reader must never see half a line. [`JsonLines::append`]
//! writes one whole line; when the write fails it cuts the file back to where the line began, warns
//! once with the file's name and the cause, counts what was lost, and goes on.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Where lines go: a file, or anything that can be cut back after a failed write.
pub trait Sink: Write {
    /// Cuts the sink back to `len` bytes and writes from there on.
    fn cut_to(&mut self, len: u64) -> std::io::Result<()>;
}

impl Sink for File {
    fn cut_to(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)?;
        self.seek(SeekFrom::Start(len)).map(|_| ())
    }
}

/// A JSON-lines metrics file.
pub struct JsonLines<S: Sink = File> {
    path: PathBuf,
    sink: S,
    /// Bytes of whole lines written.
    len: u64,
    /// Lines that could not be written.
    lost: u64,
}

impl JsonLines<File> {
    /// Opens `path` for metrics (making its directory); `append` keeps what is there (a resumed
    /// run), else the file starts empty. The error names the file.
    pub fn open(path: &Path, append: bool) -> Result<Self, String> {
        let named = |e: std::io::Error| format!("{}: {e}", path.display());
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(!append)
            .open(path)
            .map_err(named)?;
        let mut len = file.seek(SeekFrom::End(0)).map_err(named)?;
        if append && len > 0 {
            // A line cut short by a crash is dropped, so that every line is whole.
            let text = std::fs::read(path).map_err(named)?;
            let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) as u64;
            if whole != len {
                file.cut_to(whole).map_err(named)?;
                len = whole;
            }
        }
        Ok(JsonLines::new(path, file, len))
    }
}

impl<S: Sink> JsonLines<S> {
    /// Lines to `sink`, which holds `len` bytes already; `path` names it in warnings.
    pub fn new(path: &Path, sink: S, len: u64) -> Self {
        JsonLines {
            path: path.to_path_buf(),
            sink,
            len,
            lost: 0,
        }
    }

    /// Writes `value` as one line, or nothing.
    pub fn append(&mut self, value: &impl serde::Serialize) {
        let mut line = match serde_json::to_vec(value) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(file = %self.path.display(), "a metrics line could not be made: {e}");
                return;
            }
        };
        line.push(b'\n');
        match self.sink.write_all(&line).and_then(|_| self.sink.flush()) {
            Ok(()) => self.len += line.len() as u64,
            Err(e) => {
                if self.lost == 0 {
                    tracing::warn!(
                        file = %self.path.display(),
                        "cannot write metrics: {e}; carrying on without them until writing works again"
                    );
                }
                self.lost += 1;
                if let Err(e) = self.sink.cut_to(self.len) {
                    tracing::debug!(file = %self.path.display(), "cannot cut back a partial line: {e}");
                }
            }
        }
    }

    /// Lines that could not be written.
    pub fn lost(&self) -> u64 {
        self.lost
    }
}

/// Every whole line of a metrics file that parses as `T`, in order (a line cut short by a crash
/// or a full disk is skipped). A missing file is an error.
pub fn read_all<T: serde::de::DeserializeOwned>(path: &Path) -> std::io::Result<Vec<T>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// The last line of a metrics file that parses as `T`, reading only the file's end: a run of
/// days has metrics files of hundreds of megabytes, and the progress line reads this twice a
/// second. `None` when the file is missing or holds no such line.
pub fn read_last<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    use std::io::Read;
    const TAIL: u64 = 64 << 10;
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let start = len.saturating_sub(TAIL);
    file.seek(SeekFrom::Start(start)).ok()?;
    let mut bytes = Vec::with_capacity((len - start) as usize);
    file.read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    // Past the start of the file, the first line of the tail may be cut: it is never the last.
    let lines = text.lines().skip(usize::from(start > 0));
    lines
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
}

/// Writes `bytes` to `path` through a temporary file and a rename: the file is whole or as it
/// was. The error names the file and its first cause.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let result = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("{}: {e}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_last_whole_line_is_read_from_the_end_of_a_long_file() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("m.jsonl");
        let mut text = String::new();
        for step in 0..20_000u64 {
            text.push_str(&format!("{{\"step\":{step}}}\n"));
        }
        // A line cut short by a crash at the end.
        text.push_str("{\"step\":2");
        std::fs::write(&path, &text).unwrap();
        let last: serde_json::Value = read_last(&path).unwrap();
        assert_eq!(last["step"], 19_999);
        let all: Vec<serde_json::Value> = read_all(&path).unwrap();
        assert_eq!(all.len(), 20_000);
        assert!(read_last::<serde_json::Value>(&d.path().join("none")).is_none());
    }

    use super::*;

    /// A sink that takes `room` bytes, then fails like a full disk (after a partial write).
    struct Full {
        data: Vec<u8>,
        room: usize,
    }

    impl Write for Full {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.room.saturating_sub(self.data.len()));
            if n == 0 {
                return Err(std::io::Error::from_raw_os_error(28));
            }
            self.data.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink for Full {
        fn cut_to(&mut self, len: u64) -> std::io::Result<()> {
            self.data.truncate(len as usize);
            Ok(())
        }
    }

    #[test]
    fn a_full_disk_leaves_whole_lines_only_and_writing_resumes_when_there_is_room() {
        let mut m = JsonLines::new(
            Path::new("m.jsonl"),
            Full {
                data: vec![],
                room: 30,
            },
            0,
        );
        for step in 0..5 {
            m.append(&serde_json::json!({ "step": step, "loss": 1.5 }));
        }
        let text = String::from_utf8(m.sink.data.clone()).unwrap();
        assert!(text.ends_with('\n'), "{text:?}");
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text:?}");
        assert_eq!(m.lost(), 4);
        m.sink.room = 1000;
        m.append(&serde_json::json!({ "step": 9 }));
        let text = String::from_utf8(m.sink.data.clone()).unwrap();
        for l in text.lines() {
            serde_json::from_str::<serde_json::Value>(l).unwrap();
        }
        assert_eq!(text.lines().count(), 2);
    }

    #[test]
    fn a_file_that_cannot_take_lines_loses_them_quietly_and_a_reopened_one_drops_a_cut_line() {
        let mut m = JsonLines::open(Path::new("/dev/full"), true).unwrap();
        m.append(&serde_json::json!({ "step": 1 }));
        assert_eq!(m.lost(), 1);

        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/m.jsonl");
        let mut m = JsonLines::open(&p, false).unwrap();
        m.append(&serde_json::json!({ "step": 1 }));
        drop(m);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"{\"st")
            .unwrap();
        let mut m = JsonLines::open(&p, true).unwrap();
        m.append(&serde_json::json!({ "step": 2 }));
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"step\":1}\n{\"step\":2}\n"
        );
    }

    #[test]
    fn an_atomic_write_names_the_file_it_could_not_write() {
        let e = write_atomic(Path::new("/proc/nonexistent/x.json"), b"{}").unwrap_err();
        assert!(e.contains("/proc/nonexistent/x.json"), "{e}");
    }
}
