//! The scored-shard cache: reference losses computed once, trained on many times.
//!
//! A cache is a directory of part files, one per selector process that wrote to it
//! (`part-*.rsc`), each with an index (`part-*.rsc.idx`). docs/CACHE.md is the specification:
//!
//! - a part file starts with the line `RHOSC1` and a JSON header line
//!   `{"version":1,"run_id":..,"tokenizer":"sha256:..","ref_model":"sha256:.."}`;
//! - then records, each `[u64 LE payload length][u32 LE CRC-32 of the payload][payload]`, the
//!   payload being one unsigned `scored` message of docs/PROTOCOL.md as
//!   `[u32 LE frame count]` then per frame `[u64 LE length][bytes]`;
//! - the index holds one JSON line per record: `{"seq":..,"offset":..,"len":..,"crc":..}`
//!   (`offset` of the record's first byte, `len` of its payload).
//!
//! Writing streams (one record at a time, flushed per record); reading seeks by sequence number
//! and checks every record's CRC, so a truncated or corrupted file is found and named.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use rho_protocol::{Fingerprint, Limits, Message, ScoredBatch};

const MAGIC: &str = "RHOSC1";

/// What every part file of a cache declares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheHeader {
    /// The cache format version (1).
    pub version: u32,
    /// The run whose batches these are.
    pub run_id: String,
    /// Fingerprint of the tokenizer the batches were made with.
    pub tokenizer: Fingerprint,
    /// Fingerprint of the reference model that scored them.
    pub ref_model: Fingerprint,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct IndexEntry {
    seq: u64,
    offset: u64,
    len: u64,
    crc: u32,
}

/// A cache error, naming the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file of the cache cannot be read or written, or is damaged.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The cache as a whole cannot be used (no parts, parts that disagree, ...).
    #[error("cache {dir}: {reason}")]
    Cache {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> CacheError {
    CacheError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Appends scored batches to one part file of a cache directory.
pub struct CacheWriter {
    path: PathBuf,
    file: std::io::BufWriter<File>,
    index: std::io::BufWriter<File>,
    offset: u64,
    header: CacheHeader,
    /// Bytes written, records written.
    pub bytes: u64,
    /// Records (scored batches) written.
    pub records: u64,
}

impl CacheWriter {
    /// Creates a new part file in `dir` (created if needed).
    pub fn create(dir: &Path, header: CacheHeader) -> Result<Self, CacheError> {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = dir.join(format!("part-{}-{stamp}.rsc", std::process::id()));
        let mut file =
            std::io::BufWriter::new(File::create(&path).map_err(|e| file_err(&path, e))?);
        let head = format!(
            "{MAGIC}\n{}\n",
            serde_json::to_string(&header).map_err(|e| file_err(&path, e))?
        );
        file.write_all(head.as_bytes())
            .map_err(|e| file_err(&path, e))?;
        let idx_path = path.with_extension("rsc.idx");
        let index =
            std::io::BufWriter::new(File::create(&idx_path).map_err(|e| file_err(&idx_path, e))?);
        Ok(CacheWriter {
            offset: head.len() as u64,
            bytes: head.len() as u64,
            records: 0,
            path,
            file,
            index,
            header,
        })
    }

    /// The part file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one `scored` message (its fingerprints must be the cache's).
    pub fn append(&mut self, message: &Message) -> Result<(), CacheError> {
        let Message::Scored(scored) = message else {
            return Err(file_err(
                &self.path,
                format!("a cache holds `scored` messages, not `{}`", message.kind()),
            ));
        };
        if scored.ref_model != self.header.ref_model
            || scored.batch.tokenizer != self.header.tokenizer
        {
            return Err(file_err(
                &self.path,
                format!(
                    "batch {} was made with tokenizer {} and reference {}, not this cache's",
                    scored.batch.seq, scored.batch.tokenizer, scored.ref_model
                ),
            ));
        }
        // The payload is the frame count, then each frame's length and bytes: hashed and
        // written frame by frame, never assembled in memory.
        let frames = message.encode();
        let count = (frames.len() as u32).to_le_bytes();
        let lens: Vec<[u8; 8]> = frames
            .iter()
            .map(|f| (f.len() as u64).to_le_bytes())
            .collect();
        let len = 4 + frames.iter().map(|f| 8 + f.len() as u64).sum::<u64>();
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&count);
        for (l, f) in lens.iter().zip(&frames) {
            hasher.update(l);
            hasher.update(f);
        }
        let crc = hasher.finalize();
        let write = |w: &mut std::io::BufWriter<File>| -> std::io::Result<()> {
            w.write_all(&len.to_le_bytes())?;
            w.write_all(&crc.to_le_bytes())?;
            w.write_all(&count)?;
            for (l, f) in lens.iter().zip(&frames) {
                w.write_all(l)?;
                w.write_all(f)?;
            }
            w.flush()
        };
        write(&mut self.file).map_err(|e| file_err(&self.path, e))?;
        let entry = IndexEntry {
            seq: scored.batch.seq,
            offset: self.offset,
            len,
            crc,
        };
        let line = serde_json::to_string(&entry).map_err(|e| file_err(&self.path, e))?;
        writeln!(self.index, "{line}")
            .and_then(|_| self.index.flush())
            .map_err(|e| file_err(&self.path, e))?;
        let n = 12 + len;
        self.offset += n;
        self.bytes += n;
        self.records += 1;
        Ok(())
    }
}

struct Part {
    path: PathBuf,
    len: u64,
}

/// A cache opened for reading: every sequence number it holds, where.
pub struct CacheReader {
    dir: PathBuf,
    header: CacheHeader,
    parts: Vec<Part>,
    index: BTreeMap<u64, (usize, IndexEntry)>,
    open: Option<(usize, File)>,
    limits: Limits,
}

fn read_header(path: &Path) -> Result<CacheHeader, CacheError> {
    let mut r = BufReader::new(File::open(path).map_err(|e| file_err(path, e))?);
    let mut magic = String::new();
    r.read_line(&mut magic).map_err(|e| file_err(path, e))?;
    if magic.trim_end() != MAGIC {
        return Err(file_err(path, "not a rho scored-shard file (bad magic)"));
    }
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| file_err(path, e))?;
    let header: CacheHeader =
        serde_json::from_str(&line).map_err(|e| file_err(path, format!("bad header: {e}")))?;
    if header.version != 1 {
        return Err(file_err(
            path,
            format!("version {} (this build reads 1)", header.version),
        ));
    }
    Ok(header)
}

impl CacheReader {
    /// Opens every part of `dir` and reads the indexes. All parts must agree on run, tokenizer
    /// and reference model.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        let cache_err = |reason: String| CacheError::Cache {
            dir: dir.to_path_buf(),
            reason,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| file_err(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "rsc"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(cache_err("no part files (part-*.rsc)".into()));
        }
        let mut header: Option<CacheHeader> = None;
        let mut parts = Vec::new();
        let mut index = BTreeMap::new();
        for path in files {
            let h = read_header(&path)?;
            match &header {
                None => header = Some(h),
                Some(first) if *first != h => {
                    return Err(file_err(
                        &path,
                        format!(
                            "belongs to another cache: tokenizer {}, reference {}, run `{}` (the first part has {}, {}, `{}`)",
                            h.tokenizer, h.ref_model, h.run_id, first.tokenizer, first.ref_model, first.run_id
                        ),
                    ))
                }
                Some(_) => {}
            }
            let len = std::fs::metadata(&path)
                .map_err(|e| file_err(&path, e))?
                .len();
            let idx_path = path.with_extension("rsc.idx");
            let text = std::fs::read_to_string(&idx_path).map_err(|e| file_err(&idx_path, e))?;
            for (n, line) in text.lines().enumerate() {
                let e: IndexEntry = serde_json::from_str(line)
                    .map_err(|e| file_err(&idx_path, format!("line {}: {e}", n + 1)))?;
                if e.offset + 12 + e.len > len {
                    return Err(file_err(
                        &path,
                        format!(
                            "truncated: batch {} ends at byte {}, the file has {len}",
                            e.seq,
                            e.offset + 12 + e.len
                        ),
                    ));
                }
                index.entry(e.seq).or_insert((parts.len(), e));
            }
            parts.push(Part { path, len });
        }
        Ok(CacheReader {
            dir: dir.to_path_buf(),
            header: header.expect("at least one part"),
            parts,
            index,
            open: None,
            limits: Limits::default(),
        })
    }

    /// The header every part of the cache shares.
    pub fn header(&self) -> &CacheHeader {
        &self.header
    }

    /// Batches `0..n` are all present: `n`, the stream this cache can serve.
    pub fn contiguous(&self) -> u64 {
        let mut n = 0;
        while self.index.contains_key(&n) {
            n += 1;
        }
        n
    }

    /// Distinct batches held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the cache holds no batch.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes of all part files.
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.len).sum()
    }

    /// Reads batch `seq`, checking its CRC.
    pub fn read(&mut self, seq: u64) -> Result<ScoredBatch, CacheError> {
        let &(part, e) = self.index.get(&seq).ok_or_else(|| CacheError::Cache {
            dir: self.dir.clone(),
            reason: format!("holds no batch {seq}"),
        })?;
        let path = self.parts[part].path.clone();
        if self.open.as_ref().is_none_or(|(p, _)| *p != part) {
            self.open = Some((part, File::open(&path).map_err(|e| file_err(&path, e))?));
        }
        let (_, file) = self.open.as_mut().expect("opened above");
        file.seek(SeekFrom::Start(e.offset))
            .map_err(|e| file_err(&path, e))?;
        let mut head = [0u8; 12];
        file.read_exact(&mut head)
            .map_err(|err| file_err(&path, format!("batch {seq}: {err}")))?;
        let len = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(head[8..].try_into().expect("4 bytes"));
        if len != e.len || crc != e.crc {
            return Err(file_err(
                &path,
                format!("batch {seq}: the record does not match the index (corrupted)"),
            ));
        }
        let mut payload = vec![0u8; len as usize];
        file.read_exact(&mut payload)
            .map_err(|err| file_err(&path, format!("batch {seq}: {err}")))?;
        if crc32fast::hash(&payload) != crc {
            return Err(file_err(
                &path,
                format!("batch {seq}: checksum mismatch (corrupted)"),
            ));
        }
        let frames = split_frames(Bytes::from(payload))
            .ok_or_else(|| file_err(&path, format!("batch {seq}: malformed record")))?;
        match Message::decode(&frames, &self.limits) {
            Ok(Message::Scored(s)) if s.batch.seq == seq => Ok(s),
            Ok(_) => Err(file_err(
                &path,
                format!("batch {seq}: the record is not that scored batch"),
            )),
            Err(err) => Err(file_err(&path, format!("batch {seq}: {err}"))),
        }
    }
}

/// The frames of a record's payload, as slices of it (no copy).
fn split_frames(payload: Bytes) -> Option<Vec<Bytes>> {
    let n = u32::from_le_bytes(payload.get(..4)?.try_into().ok()?) as usize;
    let mut at = 4;
    let mut frames = Vec::with_capacity(n.min(16));
    for _ in 0..n {
        let len = u64::from_le_bytes(payload.get(at..at + 8)?.try_into().ok()?) as usize;
        at += 8;
        let end = at.checked_add(len).filter(|&e| e <= payload.len())?;
        frames.push(payload.slice(at..end));
        at = end;
    }
    (at == payload.len()).then_some(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rho_protocol::TokenBatch;

    fn scored(seq: u64) -> ScoredBatch {
        ScoredBatch {
            batch: TokenBatch {
                run_id: "r".into(),
                seq,
                epoch: 0,
                rows: 2,
                window: 3,
                tokenizer: Fingerprint::of_bytes(b"tok"),
                tokens: (0..6).map(|i| i + seq as u32).collect(),
                lengths: vec![3, 2],
                doc_starts: vec![vec![0], vec![]],
                stream: None,
                rank: None,
            },
            ref_model: Fingerprint::of_bytes(b"ref"),
            ref_loss: (0..4).map(|i| i as f32 + seq as f32).collect(),
        }
    }

    fn header() -> CacheHeader {
        CacheHeader {
            version: 1,
            run_id: "r".into(),
            tokenizer: Fingerprint::of_bytes(b"tok"),
            ref_model: Fingerprint::of_bytes(b"ref"),
        }
    }

    #[test]
    fn written_batches_read_back_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = CacheWriter::create(dir.path(), header()).unwrap();
        let mut b = CacheWriter::create(dir.path(), header()).unwrap();
        for seq in [0, 2, 3] {
            a.append(&Message::Scored(scored(seq))).unwrap();
        }
        b.append(&Message::Scored(scored(1))).unwrap();
        b.append(&Message::Scored(scored(2))).unwrap(); // a duplicate, as after a redelivery
        let mut r = CacheReader::open(dir.path()).unwrap();
        assert_eq!((r.contiguous(), r.len()), (4, 4));
        for seq in 0..4 {
            assert_eq!(r.read(seq).unwrap(), scored(seq));
        }
        // A foreign batch is refused at writing.
        let mut other = scored(9);
        other.ref_model = Fingerprint::of_bytes(b"other");
        assert!(a.append(&Message::Scored(other)).is_err());

        // One flipped byte: named by checksum.
        let path = a.path().to_path_buf();
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let mut r = CacheReader::open(dir.path()).unwrap();
        let err = r.read(3).unwrap_err().to_string();
        assert!(
            err.contains("checksum") && err.contains(path.to_str().unwrap()),
            "{err}"
        );
        // Cut short: named at opening.
        std::fs::write(&path, &bytes[..n - 10]).unwrap();
        let err = CacheReader::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("truncated") && err.contains(path.to_str().unwrap()),
            "{err}"
        );
        // A part of another cache.
        std::fs::write(&path, &bytes).unwrap();
        let mut h = header();
        h.ref_model = Fingerprint::of_bytes(b"other");
        CacheWriter::create(dir.path(), h).unwrap();
        let err = CacheReader::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("another cache"), "{err}");
    }
}
