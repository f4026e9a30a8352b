//! Checkpoints: model, optimizer state, schedule position and stream cursor, together and
//! atomically. A checkpoint is written under a temporary name and renamed into place; the
//! `latest` pointer is replaced (written, then renamed) only after that, so a crash at any moment
//! leaves either the previous checkpoint or the new one, never a half-written one that looks
//! complete.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::backend::Backend;
use crate::{Result, TrainerError};

/// What resumes the stream and the schedule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TrainerState {
    pub run_id: String,
    /// Steps taken.
    pub step: u64,
    /// The next batch sequence number to train on (the stream cursor).
    pub next_seq: u64,
    /// Valid target tokens trained on so far.
    pub tokens: u64,
}

fn err(path: &Path, e: impl std::fmt::Display) -> TrainerError {
    TrainerError::Checkpoint(format!("{}: {e}", path.display()))
}

/// Writes a checkpoint of `backend` and `state` into `dir/step-NNNNNNNN` and points `latest` at it.
pub fn save(dir: &Path, backend: &dyn Backend, state: &TrainerState) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    let name = format!("step-{:08}", state.step);
    let tmp = dir.join(format!(".tmp-{name}"));
    let _ = std::fs::remove_dir_all(&tmp);
    backend.save(&tmp)?;
    let state_path = tmp.join("state.json");
    std::fs::write(
        &state_path,
        serde_json::to_vec_pretty(state).unwrap_or_default(),
    )
    .map_err(|e| err(&state_path, e))?;
    let final_dir = dir.join(&name);
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(|e| err(&final_dir, e))?;
    let pointer = dir.join("latest");
    let pointer_tmp = dir.join(".latest.tmp");
    std::fs::write(&pointer_tmp, &name).map_err(|e| err(&pointer_tmp, e))?;
    std::fs::rename(&pointer_tmp, &pointer).map_err(|e| err(&pointer, e))?;
    Ok(final_dir)
}

/// The latest complete checkpoint of `dir`, if any.
pub fn latest(dir: &Path) -> Result<Option<(PathBuf, TrainerState)>> {
    let pointer = dir.join("latest");
    let Ok(name) = std::fs::read_to_string(&pointer) else {
        return Ok(None);
    };
    let path = dir.join(name.trim());
    let state_path = path.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| err(&state_path, e))?;
    let state = serde_json::from_str(&text).map_err(|e| err(&state_path, e))?;
    Ok(Some((path, state)))
}
