//! Control messages: a JSON header frame and nothing else.

use serde::{Deserialize, Serialize};

/// Which process sent a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Loader,
    Selector,
    Trainer,
    Client,
}

/// A consumer asks for `n` more batches (work request). A producer sends nothing unasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credit {
    pub run_id: String,
    pub n: u32,
}

/// The trainer has consumed these batches; the loader may forget them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub run_id: String,
    pub seqs: Vec<u64>,
}

/// Liveness, both ways. A peer that answers no heartbeat is presumed dead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub run_id: String,
    pub role: Role,
    /// Sender's clock, milliseconds since the Unix epoch (informational).
    pub at_ms: u64,
}

/// The resume cursor: the consumer wants the stream to continue at batch `next_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub run_id: String,
    pub next_seq: u64,
}

/// Stop: the sender is going away, or asks the receiver to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shutdown {
    pub run_id: String,
    pub reason: String,
}

/// The stream is exhausted: no batch with `seq >= total` will ever be issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    pub run_id: String,
    pub total: u64,
}
