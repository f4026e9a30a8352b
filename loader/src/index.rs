//! The shard index: how many tokens each shard yields under a given tokenization, kept on disk
//! so that resuming at batch `n` skips whole shards instead of re-tokenizing them.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const FILE_NAME: &str = "shard-index.json";
const VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
struct Entry {
    size: u64,
    mtime_ns: u64,
    tokens: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct IndexFile {
    version: u32,
    /// Everything the counts depend on (tokenizer fingerprint, special tokens, text field...).
    key: String,
    shards: BTreeMap<String, Entry>,
}

/// Token counts per shard, valid while the shard's size and modification time are unchanged.
#[derive(Debug)]
pub struct ShardIndex {
    file: Option<PathBuf>,
    key: String,
    shards: BTreeMap<String, Entry>,
}

fn stamp(path: &Path) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    let mtime = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos() as u64;
    Some((meta.len(), mtime))
}

impl ShardIndex {
    /// Opens the index in `state_dir` (in memory only when `None`). Entries made under another
    /// key, or an unreadable file, are ignored: the counts are then rebuilt as shards are read.
    pub fn open(state_dir: Option<&Path>, key: String) -> Self {
        let file = state_dir.map(|d| d.join(FILE_NAME));
        let shards = file
            .as_deref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| serde_json::from_slice::<IndexFile>(&b).ok())
            .filter(|i| i.version == VERSION && i.key == key)
            .map(|i| i.shards)
            .unwrap_or_default();
        ShardIndex { file, key, shards }
    }

    /// The shard's token count, if known and the file is unchanged.
    pub fn get(&self, path: &Path) -> Option<u64> {
        let entry = self.shards.get(path.to_string_lossy().as_ref())?;
        let (size, mtime_ns) = stamp(path)?;
        (entry.size == size && entry.mtime_ns == mtime_ns).then_some(entry.tokens)
    }

    /// Records a count and writes the index (atomically: temp file, then rename).
    pub fn put(&mut self, path: &Path, tokens: u64) {
        let Some((size, mtime_ns)) = stamp(path) else {
            return;
        };
        let entry = Entry {
            size,
            mtime_ns,
            tokens,
        };
        let key = path.to_string_lossy().into_owned();
        if self.shards.get(&key) == Some(&entry) {
            return;
        }
        self.shards.insert(key, entry);
        if let Err(e) = self.save() {
            tracing::warn!("cannot write the shard index: {e}");
        }
    }

    fn save(&self) -> std::io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let body = IndexFile {
            version: VERSION,
            key: self.key.clone(),
            shards: self.shards.clone(),
        };
        // A temporary file of this process's own: the loaders of several ranks may share a
        // `state_dir` (their counts agree: every rank reads the whole corpus).
        let tmp = file.with_extension(format!("json.tmp.{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&body)?)?;
        std::fs::rename(&tmp, file)
    }
}
