//! TensorBoard event files: each process writes its scalars as `Event` records that
//! TensorBoard reads live (`tensorboard --logdir RUN_DIR`).
//!
//! The format is TensorFlow's record file: for each record, its length (u64, little-endian), the
//! masked CRC-32C of those 8 bytes, the record, and the masked CRC-32C of the record. A record is
//! an `Event` protocol buffer: the first one names the file version, the others hold a wall time,
//! a step and a `Summary` of scalars (or, for a resumed run, a `SessionLog` START, after which
//! TensorBoard drops the events of later steps that an earlier attempt wrote, so that the curves
//! continue without duplicated steps).
//!
//! Rules, as for metrics lines ([`crate::jsonl`]): a record is written whole or not at all (a
//! failed write is cut back), a failure is warned about once, and nothing here ever stops a
//! process: the next record is tried again.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// An event file being written.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: File,
    /// Bytes of whole records in the file.
    len: u64,
    warned: bool,
}

impl EventWriter {
    /// Creates a new event file in `dir` (created if needed). With `resumed_at`, the run
    /// continues after that step: events of later steps in earlier files are dropped by
    /// TensorBoard.
    pub fn create(dir: &Path, resumed_at: Option<u64>) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        let name = format!("events.out.tfevents.{secs}.{host}.{}", std::process::id());
        let path = dir.join(name);
        let file = File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut w = EventWriter {
            path,
            file,
            len: 0,
            warned: false,
        };
        w.record(&event(wall_time(), 0, Body::FileVersion("brain.Event:2")));
        if let Some(step) = resumed_at {
            w.record(&event(wall_time(), step + 1, Body::Start));
        }
        Ok(w)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the scalars `(tag, value)` of `step` as one event.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) {
        self.record(&event(wall_time(), step, Body::Scalars(values)));
    }

    /// Writes one record, whole or not at all.
    fn record(&mut self, data: &[u8]) {
        let mut bytes = Vec::with_capacity(data.len() + 16);
        let len = (data.len() as u64).to_le_bytes();
        bytes.extend_from_slice(&len);
        bytes.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        bytes.extend_from_slice(data);
        bytes.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        match self.file.write_all(&bytes) {
            Ok(()) => self.len += bytes.len() as u64,
            Err(e) => {
                // Cut a partial record back, so that readers see whole records only.
                let _ = self.file.set_len(self.len);
                let _ = std::io::Seek::seek(&mut self.file, std::io::SeekFrom::Start(self.len));
                if !self.warned {
                    tracing::warn!(file = %self.path.display(), "cannot write TensorBoard events: {e}; training goes on");
                    self.warned = true;
                }
            }
        }
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

enum Body<'a> {
    FileVersion(&'a str),
    Scalars(&'a [(&'a str, f64)]),
    /// `SessionLog { status: START }`.
    Start,
}

/// An `Event` protocol buffer: `wall_time` (1, double), `step` (2, int64), then
/// `file_version` (3, string), `summary` (5) or `session_log` (6).
fn event(wall_time: f64, step: u64, body: Body) -> Vec<u8> {
    let mut out = Vec::new();
    out.push(0x09);
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(0x10);
    varint(&mut out, step);
    match body {
        Body::FileVersion(v) => bytes_field(&mut out, 3, v.as_bytes()),
        Body::Scalars(values) => {
            // Summary { repeated Value value = 1 }; Value { tag = 1, simple_value = 2 (float) }.
            let mut summary = Vec::new();
            for (tag, value) in values {
                let mut v = Vec::new();
                bytes_field(&mut v, 1, tag.as_bytes());
                v.push(0x15);
                v.extend_from_slice(&(*value as f32).to_le_bytes());
                bytes_field(&mut summary, 1, &v);
            }
            bytes_field(&mut out, 5, &summary);
        }
        // SessionLog { status = 1 (START) }.
        Body::Start => bytes_field(&mut out, 6, &[0x08, 0x01]),
    }
    out
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A length-delimited field.
fn bytes_field(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push((field << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// CRC-32C (Castagnoli), as TensorFlow's records use it.
fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    /// Reads the records of an event file back, checking both CRCs of each.
    fn records(path: &Path) -> Vec<Vec<u8>> {
        let bytes = std::fs::read(path).unwrap();
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(crc, masked_crc32c(len_bytes));
            let data = bytes[at + 12..at + 12 + len].to_vec();
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc32c(&data));
            out.push(data);
            at += 16 + len;
        }
        out
    }

    #[test]
    fn events_are_whole_records_with_the_version_first() {
        let d = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(&d.path().join("trainer"), Some(41)).unwrap();
        w.scalars(42, &[("loss/all", 2.5), ("lr", 1e-3)]);
        let r = records(w.path());
        assert_eq!(r.len(), 3);
        // The version, then START at the first new step, then the scalars.
        assert!(r[0].windows(13).any(|x| x == b"brain.Event:2"));
        assert_eq!(&r[1][9..11], &[0x10, 42]);
        assert!(r[1].ends_with(&[0x32, 2, 0x08, 0x01]));
        assert_eq!(&r[2][9..11], &[0x10, 42]);
        assert!(r[2].windows(8).any(|x| x == b"loss/all"));
        assert!(r[2].windows(4).any(|x| x == 2.5f32.to_le_bytes()));
    }

    #[test]
    fn large_steps_are_varints() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, vec![0xAC, 0x02]);
    }
}
