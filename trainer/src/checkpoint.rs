//! Checkpoints: model, optimizer state, schedule position and stream cursor, together and
//! atomically, in `dir/step-NNNNNNNN/`.
//!
//! A checkpoint is written under a temporary name (`.tmp-step-NNNNNNNN`), its files synced, a
//! `manifest.json` (every file's size and CRC-32) written last, and the directory renamed into
//! place; the `latest` pointer is replaced (written, then renamed) only after that. A checkpoint is
//! *complete* when every file of its manifest is there with its size and CRC.
//!
//! The rules a trainer keeps with [`Checkpoints`]:
//! - one trainer per checkpoint directory at a time (a lock file, `.lock`, names the holder);
//! - a run never writes over checkpoints it did not make: a run that does not resume refuses a
//!   directory that holds checkpoints unless told to overwrite them (then they are removed first,
//!   so that the directory never mixes two runs), and no run replaces a `step-*` directory that
//!   it did not write;
//! - a resumed run starts from the newest complete checkpoint; a missing, unreadable or stale
//!   `latest` is recovered from it (and rewritten), and a directory whose checkpoints all fail to
//!   verify is refused with each one named;
//! - leftovers of an interrupted save (`.tmp-step-*`, `.latest.tmp`) are ignored by name and
//!   removed by the directory's owner.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::backend::Backend;
use crate::{Result, TrainerError};

/// What resumes the stream and the schedule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TrainerState {
    /// The run the checkpoint belongs to.
    pub run_id: String,
    /// Steps taken.
    pub step: u64,
    /// The next batch sequence number to train on (the stream cursor).
    pub next_seq: u64,
    /// Valid target tokens trained on so far.
    pub tokens: u64,
    /// What the stream was, as the trainer saw it (absent in checkpoints of older builds).
    #[serde(default, skip_serializing_if = "StreamSeen::is_empty")]
    pub stream: StreamSeen,
}

/// The identity of the stream a checkpoint was trained on, as far as the batches show it: a
/// resumed run whose batches differ in any of these is refused with the item named.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamSeen {
    /// The tokenizer fingerprint of the batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<rho_protocol::Fingerprint>,
    /// Target positions per row (the loader's `seq_len`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq_len: Option<usize>,
    /// The reference model of the scored batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<rho_protocol::Fingerprint>,
    /// What shaped the stream, as its loader stamped it on the batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loader: Option<rho_protocol::StreamIdentity>,
}

impl StreamSeen {
    fn is_empty(&self) -> bool {
        *self == StreamSeen::default()
    }
}

/// One file of a checkpoint, as written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct FileEntry {
    bytes: u64,
    crc32: u32,
}

const MANIFEST: &str = "manifest.json";
const POINTER: &str = "latest";
const POINTER_TMP: &str = ".latest.tmp";
const TMP_PREFIX: &str = ".tmp-";

/// An IO failure on `path`, for `map_err`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainerError + '_ {
    move |source| TrainerError::io(path, source)
}

/// The step of a checkpoint directory's name: `step-` and digits, nothing else.
pub fn step_of_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn name_of_step(step: u64) -> String {
    format!("step-{step:08}")
}

/// The `step-*` directories of `dir`, newest first.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(TrainerError::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        if let Some(step) = name.to_str().and_then(step_of_name) {
            if entry.path().is_dir() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort_by_key(|e| std::cmp::Reverse(e.0));
    Ok(out)
}

fn crc_of(path: &Path) -> std::io::Result<(u64, u32)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((bytes, hasher.finalize()))
}

/// Every file under `root` (relative, `/`-separated), sorted.
fn files_under(root: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(root.join(&rel))? {
            let entry = entry?;
            let r = rel.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                stack.push(r);
            } else {
                out.push(r.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn sync_path(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Writes the manifest of a finished checkpoint directory (after syncing its files).
fn write_manifest(dir: &Path) -> Result<()> {
    let mut files = BTreeMap::new();
    for rel in files_under(dir).map_err(io(dir))? {
        let path = dir.join(&rel);
        sync_path(&path).map_err(io(&path))?;
        let (bytes, crc32) = crc_of(&path).map_err(io(&path))?;
        files.insert(rel, FileEntry { bytes, crc32 });
    }
    let path = dir.join(MANIFEST);
    let text = serde_json::to_vec_pretty(&serde_json::json!({ "files": files }))
        .map_err(|e| TrainerError::checkpoint(&path, e))?;
    std::fs::write(&path, text).map_err(io(&path))?;
    sync_path(&path).map_err(io(&path))?;
    Ok(())
}

/// Checks a checkpoint directory against its manifest and reads its state; the error names the
/// file at fault and what is wrong with it.
pub fn verify(dir: &Path) -> Result<TrainerState> {
    let bad = |path: &Path, reason: &dyn std::fmt::Display| TrainerError::checkpoint(path, reason);
    let manifest_path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&manifest_path)
        .map_err(|e| bad(&manifest_path, &format!("{e} (an incomplete checkpoint)")))?;
    #[derive(Deserialize)]
    struct Manifest {
        files: BTreeMap<String, FileEntry>,
    }
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| bad(&manifest_path, &e))?;
    if !manifest.files.contains_key("state.json") {
        return Err(bad(&manifest_path, &"lists no state.json"));
    }
    for (rel, want) in &manifest.files {
        let path = dir.join(rel);
        let (bytes, crc32) = crc_of(&path).map_err(|e| bad(&path, &e))?;
        if bytes != want.bytes {
            let why = format!("{bytes} bytes, the manifest says {}", want.bytes);
            return Err(bad(&path, &why));
        }
        if crc32 != want.crc32 {
            return Err(bad(&path, &"CRC-32 differs from the manifest"));
        }
    }
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| bad(&state_path, &e))?;
    serde_json::from_str(&text).map_err(|e| bad(&state_path, &e))
}

/// The newest complete checkpoint of `dir`, if `dir` holds any checkpoint at all; `latest` is
/// rewritten when it was missing, unreadable or pointed elsewhere. `Err` when checkpoints exist
/// and none verifies, or when `latest` names a checkpoint that is not there.
pub fn newest_complete(dir: &Path) -> Result<Option<(PathBuf, TrainerState)>> {
    let pointer = dir.join(POINTER);
    let named = match std::fs::read_to_string(&pointer) {
        Ok(s) => Some(Ok(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(Err(e.to_string())),
    };
    let mut failures = Vec::new();
    for (_, path) in list(dir)? {
        match verify(&path) {
            Ok(state) => {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if named.as_ref().and_then(|n| n.as_ref().ok()) != Some(&name) {
                    tracing::warn!(
                        pointer = %pointer.display(),
                        was = ?named,
                        recovered = %name,
                        "`latest` was missing, unreadable or not the newest complete checkpoint: resuming from the newest complete one and pointing `latest` at it"
                    );
                    write_pointer(dir, &name)?;
                }
                for f in &failures {
                    tracing::warn!("skipped an incomplete checkpoint: {f}");
                }
                return Ok(Some((path, state)));
            }
            Err(reason) => failures.push(reason.to_string()),
        }
    }
    if !failures.is_empty() {
        return Err(TrainerError::checkpoint(
            dir,
            format!(
                "holds checkpoints, but none is complete: {}",
                failures.join("; ")
            ),
        ));
    }
    if let Some(named) = named {
        return Err(TrainerError::checkpoint(
            &pointer,
            format!(
                "names {:?}, but {} holds no step-* checkpoint: restore it, or remove `latest` to start afresh",
                named.unwrap_or_else(|e| e),
                dir.display()
            ),
        ));
    }
    Ok(None)
}

fn write_pointer(dir: &Path, name: &str) -> Result<()> {
    let pointer = dir.join(POINTER);
    let pointer_tmp = dir.join(POINTER_TMP);
    std::fs::write(&pointer_tmp, name).map_err(io(&pointer_tmp))?;
    std::fs::rename(&pointer_tmp, &pointer).map_err(io(&pointer))?;
    Ok(())
}

/// Leftovers of interrupted saves: `.tmp-step-*` directories and `.latest.tmp`.
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n == POINTER_TMP
                || n.strip_prefix(TMP_PREFIX)
                    .is_some_and(|s| step_of_name(s).is_some())
        })
        .map(|e| e.path())
        .collect()
}

fn remove(path: &Path) -> Result<()> {
    let r = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    r.map_err(io(path))
}

/// The checkpoint directory of one trainer: held (locked) for the trainer's life.
#[derive(Debug)]
pub struct Checkpoints {
    dir: PathBuf,
    _lock: rho_common::lock::DirLock,
    /// `step-*` directories this process wrote (it may replace those), and the one it resumed
    /// from (saving the same step again changes nothing).
    written: std::collections::HashSet<u64>,
    resumed: Option<u64>,
}

impl Checkpoints {
    /// Takes `dir` for this trainer and decides where the run starts: `Some` checkpoint to
    /// resume from (with `resume`), or `None` for a fresh start. Without `resume`, a directory
    /// holding checkpoints is refused unless `overwrite`, and then emptied of them first.
    pub fn open(
        dir: &Path,
        resume: bool,
        overwrite: bool,
    ) -> Result<(Self, Option<(PathBuf, TrainerState)>)> {
        let lock = rho_common::lock::DirLock::acquire(dir)
            .map_err(|e| TrainerError::checkpoint(dir, e))?;
        for path in leftovers(dir) {
            tracing::info!(path = %path.display(), "removing what an interrupted save left");
            remove(&path)?;
        }
        let mut this = Checkpoints {
            dir: dir.to_path_buf(),
            _lock: lock,
            written: Default::default(),
            resumed: None,
        };
        let existing = list(dir)?;
        let pointer = dir.join(POINTER);
        if resume {
            let found = newest_complete(dir)?;
            this.resumed = found.as_ref().map(|(_, s)| s.step);
            return Ok((this, found));
        }
        if existing.is_empty() && !pointer.exists() {
            return Ok((this, None));
        }
        if !overwrite {
            let newest = existing
                .first()
                .map(|(_, p)| p.display().to_string())
                .unwrap_or_else(|| pointer.display().to_string());
            return Err(TrainerError::checkpoint(
                dir,
                format!("holds checkpoints of an earlier run (newest: {newest}); a run never writes over checkpoints it did not make: set `resume: true` to continue that run, `checkpoint.overwrite: true` to remove them and start afresh, or choose another `checkpoint.dir`"),
            ));
        }
        tracing::warn!(dir = %dir.display(), checkpoints = existing.len(), "`checkpoint.overwrite`: removing the checkpoints of an earlier run");
        if pointer.exists() {
            remove(&pointer)?;
        }
        for (_, path) in existing {
            remove(&path)?;
        }
        Ok((this, None))
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a checkpoint of `backend` and `state` into `dir/step-NNNNNNNN` and points `latest`
    /// at it. Saving the step it resumed from again is a no-op; a `step-*` directory this
    /// process did not write is never replaced.
    pub fn save(&mut self, backend: &dyn Backend, state: &TrainerState) -> Result<PathBuf> {
        let name = name_of_step(state.step);
        let final_dir = self.dir.join(&name);
        if self.resumed == Some(state.step) && final_dir.is_dir() {
            return Ok(final_dir);
        }
        if final_dir.exists() && !self.written.contains(&state.step) {
            return Err(TrainerError::checkpoint(
                &final_dir,
                "exists and was not written by this run; a run never writes over checkpoints it did not make",
            ));
        }
        let tmp = self.dir.join(format!("{TMP_PREFIX}{name}"));
        if tmp.exists() {
            remove(&tmp)?;
        }
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let written = (|| {
            backend.save(&tmp)?;
            let state_path = tmp.join("state.json");
            let text = serde_json::to_vec_pretty(state)
                .map_err(|e| TrainerError::checkpoint(&state_path, e))?;
            std::fs::write(&state_path, text).map_err(io(&state_path))?;
            write_manifest(&tmp)
        })();
        if let Err(e) = written {
            // The previous checkpoint stays as it was; the partial one goes.
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if final_dir.exists() {
            remove(&final_dir)?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
        let _ = sync_path(&self.dir);
        self.written.insert(state.step);
        write_pointer(&self.dir, &name)?;
        let _ = sync_path(&self.dir);
        Ok(final_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::NullBackend;

    fn state(step: u64) -> TrainerState {
        TrainerState {
            run_id: "t".into(),
            step,
            next_seq: step,
            tokens: step * 10,
            stream: Default::default(),
        }
    }

    fn saved_run(dir: &Path, steps: &[u64]) {
        let (mut c, found) = Checkpoints::open(dir, false, false).unwrap();
        assert!(found.is_none());
        for &s in steps {
            c.save(&NullBackend, &state(s)).unwrap();
        }
    }

    #[test]
    fn step_names_are_exact() {
        assert_eq!(step_of_name("step-00000050"), Some(50));
        assert_eq!(step_of_name(".tmp-step-00000050"), None);
        assert_eq!(step_of_name("step-"), None);
        assert_eq!(step_of_name("step-12a"), None);
    }

    #[test]
    fn a_missing_latest_is_recovered_from_the_newest_complete_checkpoint() {
        let d = tempfile::tempdir().unwrap();
        saved_run(d.path(), &[50, 100, 150]);
        std::fs::remove_file(d.path().join("latest")).unwrap();
        let (_c, found) = Checkpoints::open(d.path(), true, false).unwrap();
        let (path, s) = found.unwrap();
        assert_eq!(
            (path.file_name().unwrap().to_str().unwrap(), s.step),
            ("step-00000150", 150)
        );
        assert_eq!(
            std::fs::read_to_string(d.path().join("latest")).unwrap(),
            "step-00000150"
        );
    }

    #[test]
    fn an_unreadable_or_stale_latest_and_a_damaged_newest_fall_back_to_a_complete_one() {
        let d = tempfile::tempdir().unwrap();
        saved_run(d.path(), &[50, 100, 150]);
        std::fs::write(d.path().join("latest"), "garbage").unwrap();
        // The newest one is damaged: a file shorter than its manifest says.
        std::fs::write(d.path().join("step-00000150/state.json"), "{").unwrap();
        // And a leftover of an interrupted save is there.
        std::fs::create_dir_all(d.path().join(".tmp-step-00000200")).unwrap();
        let (_c, found) = Checkpoints::open(d.path(), true, false).unwrap();
        assert_eq!(found.unwrap().1.step, 100);
        assert!(!d.path().join(".tmp-step-00000200").exists());
    }

    #[test]
    fn checkpoints_that_all_fail_to_verify_are_refused_with_their_paths() {
        let d = tempfile::tempdir().unwrap();
        saved_run(d.path(), &[50]);
        std::fs::remove_file(d.path().join("step-00000050/manifest.json")).unwrap();
        let e = Checkpoints::open(d.path(), true, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("step-00000050"), "{e}");
        assert!(e.contains("none is complete"), "{e}");
        // A pointer to nothing is refused too, rather than a fresh start.
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("latest"), "step-00000050").unwrap();
        let e = Checkpoints::open(d.path(), true, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("latest"), "{e}");
    }

    #[test]
    fn a_fresh_run_never_writes_over_an_earlier_runs_checkpoints() {
        let d = tempfile::tempdir().unwrap();
        saved_run(d.path(), &[50, 100]);
        let e = Checkpoints::open(d.path(), false, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("overwrite") && e.contains("step-00000100"),
            "{e}"
        );
        assert!(d.path().join("step-00000050").is_dir());
        // Told to: the earlier checkpoints go first, so that the directory holds one run.
        let (mut c, found) = Checkpoints::open(d.path(), false, true).unwrap();
        assert!(found.is_none());
        assert!(list(d.path()).unwrap().is_empty());
        c.save(&NullBackend, &state(10)).unwrap();
        assert_eq!(list(d.path()).unwrap().len(), 1);
    }

    #[test]
    fn a_resumed_run_replaces_nothing_it_did_not_write() {
        let d = tempfile::tempdir().unwrap();
        saved_run(d.path(), &[50, 100]);
        // The newest is damaged, so the run resumes from 50; step 100 is not its own.
        std::fs::write(d.path().join("step-00000100/state.json"), "{}").unwrap();
        let (mut c, found) = Checkpoints::open(d.path(), true, false).unwrap();
        assert_eq!(found.unwrap().1.step, 50);
        c.save(&NullBackend, &state(50)).unwrap();
        let e = c.save(&NullBackend, &state(100)).unwrap_err().to_string();
        assert!(
            e.contains("step-00000100") && e.contains("did not make"),
            "{e}"
        );
        // Its own checkpoints it may write again.
        c.save(&NullBackend, &state(120)).unwrap();
        c.save(&NullBackend, &state(120)).unwrap();
    }

    #[test]
    fn one_trainer_per_directory() {
        let d = tempfile::tempdir().unwrap();
        let _first = Checkpoints::open(d.path(), true, false).unwrap();
        let e = Checkpoints::open(d.path(), true, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("in use") && e.contains("pid"), "{e}");
    }
}
