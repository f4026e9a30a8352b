//! Control messages: a JSON header frame and nothing else.

use serde::{Deserialize, Serialize};

/// Which process sent a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The loader.
    Loader,
    /// A selector.
    Selector,
    /// The trainer.
    Trainer,
    /// Another consumer of the protocol (a benchmark, a test, a PyTorch loop).
    Client,
}

/// A consumer asks for `n` more batches (work request). A producer sends nothing unasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credit {
    /// The run.
    pub run_id: String,
    /// How many more.
    pub n: u32,
    /// Only batches of this data-parallel rank; `None`: any batch of what the loader serves
    /// (docs/PROTOCOL.md, "Several ranks").
    pub rank: Option<Rank>,
}

/// One data-parallel rank of a run of `world` ranks: it trains the batches whose sequence
/// number is `rank` modulo `world`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rank {
    /// This rank, below `world`.
    pub rank: u32,
    /// How many ranks the run has.
    pub world: u32,
}

impl Rank {
    /// Rank `rank` of `world`; `None` unless `rank < world`.
    pub fn new(rank: u32, world: u32) -> Option<Rank> {
        (rank < world).then_some(Rank { rank, world })
    }
}

impl std::fmt::Display for Rank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} of {}", self.rank, self.world)
    }
}

/// The trainer has consumed these batches; the loader may forget them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The run.
    pub run_id: String,
    /// The sequence numbers consumed.
    pub seqs: Vec<u64>,
}

/// Liveness, both ways. A peer that answers no heartbeat is presumed dead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// The run.
    pub run_id: String,
    /// Who sends it.
    pub role: Role,
    /// Sender's clock, milliseconds since the Unix epoch (informational).
    pub at_ms: u64,
}

/// The resume cursor: the consumer wants the stream to continue at batch `next_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// The run.
    pub run_id: String,
    /// The first batch the consumer has not trained on.
    pub next_seq: u64,
    /// The stream the cursor belongs to (its checkpoint's); a loader whose own stream differs
    /// refuses the resume with the items named.
    pub stream: Option<Box<crate::StreamIdentity>>,
    /// The data-parallel rank resuming, when the run has several: the stream's split among
    /// the ranks then restarts at `next_seq - rank` (the global cursor), which is how a run
    /// resumes on another number of ranks (docs/PROTOCOL.md, "Several ranks").
    pub rank: Option<Rank>,
}

/// Stop: the sender is going away, or asks the receiver to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shutdown {
    /// The run.
    pub run_id: String,
    /// Why, for the logs.
    pub reason: String,
}

/// The stream is exhausted: no batch with `seq >= total` will ever be issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    /// The run.
    pub run_id: String,
    /// Batches in the stream: one past the last sequence number.
    pub total: u64,
}
