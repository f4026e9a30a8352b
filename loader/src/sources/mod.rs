//! Shard sources: find shards, and stream each as documents, skipping and reporting bad rows.
//!
//! A source never fails the loader on bad data: a row without text, invalid UTF-8, a bad JSON
//! line or an empty document becomes an [`Event::Skip`]; an unreadable or damaged part of a
//! shard becomes an [`Event::Damage`] and reading goes on with what can still be read.

mod jsonl;
mod parquet;

pub use self::parquet::{
    write_shard as write_parquet_shard, write_shard_with_tokens, Row, TokenColumns,
};

use std::path::{Path, PathBuf};

use crate::config::{DataConfig, FormatChoice};
use crate::{LoaderError, Result};

/// The on-disk format of one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Apache Parquet.
    Parquet,
    /// JSON lines.
    Jsonl,
    /// Gzip-compressed JSON lines.
    JsonlGz,
    /// Zstd-compressed JSON lines.
    JsonlZst,
}

impl Format {
    /// The format a file name implies, if any.
    pub fn from_path(path: &Path) -> Option<Format> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        if name.ends_with(".parquet") {
            Some(Format::Parquet)
        } else if name.ends_with(".jsonl.gz") || name.ends_with(".json.gz") {
            Some(Format::JsonlGz)
        } else if name.ends_with(".jsonl.zst") || name.ends_with(".json.zst") {
            Some(Format::JsonlZst)
        } else if name.ends_with(".jsonl") || name.ends_with(".json") {
            Some(Format::Jsonl)
        } else {
            None
        }
    }
}

/// A shard file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// The file.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
}

/// Why a row was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// No text field, or a null one.
    NoText,
    /// Text that is not UTF-8.
    BadUtf8,
    /// A line that is not JSON (the parser's message).
    BadJson(String),
    /// Empty text.
    Empty,
}

/// One item of a shard's stream.
#[derive(Debug)]
pub enum Event {
    /// A document and its row number in the shard (0-based).
    Doc {
        /// The row's index in the shard.
        row: u64,
        /// The document's text.
        text: String,
    },
    /// A row that holds no usable document.
    Skip {
        /// The row's index in the shard.
        row: u64,
        /// What is wrong.
        reason: SkipReason,
    },
    /// Part of the shard could not be read; `row` is where the damage starts, if known.
    Damage {
        /// The row's index in the shard.
        row: Option<u64>,
        /// What is wrong.
        reason: String,
    },
}

/// Finds the shards `data.paths` names: files, directories (recursively) and glob patterns,
/// sorted by path and without duplicates. A named file that does not exist is kept (reading it
/// reports the damage and counts it) so that nothing disappears silently.
pub fn discover(data: &DataConfig) -> Result<Vec<Shard>> {
    let mut paths = Vec::new();
    for pattern in &data.paths {
        let p = Path::new(pattern);
        if p.is_dir() {
            collect_dir(p, &mut paths).map_err(|source| LoaderError::Io {
                path: p.to_path_buf(),
                source,
            })?;
        } else if pattern.contains(['*', '?', '[']) {
            let entries = glob::glob(pattern).map_err(|e| LoaderError::ConfigField {
                field: "data.paths",
                reason: format!("bad glob `{pattern}`: {e}"),
            })?;
            paths.extend(entries.filter_map(|e| e.ok()).filter(|p| p.is_file()));
        } else {
            paths.push(p.to_path_buf());
        }
    }
    paths.sort();
    paths.dedup();
    let mut shards = Vec::new();
    for path in paths {
        let format = match data.format {
            FormatChoice::Parquet => Format::Parquet,
            FormatChoice::Jsonl => Format::from_path(&path)
                .filter(|f| *f != Format::Parquet)
                .unwrap_or(Format::Jsonl),
            FormatChoice::Auto => match Format::from_path(&path) {
                Some(f) => f,
                None => {
                    tracing::warn!(path = %path.display(), "not a shard (unknown extension); ignored");
                    continue;
                }
            },
        };
        shards.push(Shard { path, format });
    }
    if shards.is_empty() {
        return Err(LoaderError::NoShards {
            patterns: data.paths.clone(),
        });
    }
    Ok(shards)
}

fn collect_dir(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_dir(&path, out)?;
        } else if Format::from_path(&path).is_some() {
            out.push(path);
        }
    }
    Ok(())
}

/// Streams a shard's events. Opening failures come back as a single [`Event::Damage`].
pub fn open(shard: &Shard, text_field: &str) -> Box<dyn Iterator<Item = Event> + Send> {
    let result = match shard.format {
        Format::Parquet => parquet::ParquetDocs::open(&shard.path, text_field)
            .map(|r| Box::new(r) as Box<dyn Iterator<Item = Event> + Send>),
        f => jsonl::JsonlDocs::open(&shard.path, f, text_field)
            .map(|r| Box::new(r) as Box<dyn Iterator<Item = Event> + Send>),
    };
    match result {
        Ok(it) => it,
        Err(reason) => Box::new(std::iter::once(Event::Damage { row: None, reason })),
    }
}

/// Turns a row's text into an event: empty (or whitespace-only) documents are skipped.
fn doc_event(row: u64, text: String) -> Event {
    if text.trim().is_empty() {
        Event::Skip {
            row,
            reason: SkipReason::Empty,
        }
    } else {
        Event::Doc { row, text }
    }
}

/// Same, from raw bytes that must be UTF-8.
fn bytes_event(row: u64, bytes: Vec<u8>) -> Event {
    match String::from_utf8(bytes) {
        Ok(text) => doc_event(row, text),
        Err(_) => Event::Skip {
            row,
            reason: SkipReason::BadUtf8,
        },
    }
}
