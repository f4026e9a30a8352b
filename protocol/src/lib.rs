//! The rho wire protocol: the messages that the loader, the selectors and the trainer exchange,
//! their codec, and the flow-control and acknowledgement primitives they share: both ends of a
//! connection ([`client::Consumer`], [`producer::Producer`]), credits, the in-flight ledger and
//! the reorder buffer ([`flow`]). Beside them, what every process does the same way: loading a
//! tokenizer ([`tokenizer`]), owning a directory ([`lock`]), writing metrics lines ([`jsonl`]).
//!
//! Every message is one ZeroMQ multipart message: a JSON header frame, then raw little-endian
//! tensor frames whose shapes the header declares. `docs/PROTOCOL.md` is the normative
//! specification; this crate is its reference implementation.
//!
//! Guarantees of [`Message::decode`]: it never panics, whatever bytes arrive; it refuses a
//! message larger than [`Limits::max_message_bytes`] before looking inside it; and it never
//! allocates more than the size of the frames it was given.

pub mod auth;
pub mod cache;
pub mod client;
mod codec;
pub mod config_file;
mod error;
pub mod fingerprint;
pub mod flow;
pub mod jsonl;
pub mod liveness;
pub mod lock;
pub mod messages;
pub mod producer;
pub mod tokenizer;

pub use auth::Key;
pub use codec::{Limits, Message};
pub use error::DecodeError;
pub use fingerprint::Fingerprint;
pub use liveness::Liveness;
pub use messages::{Ack, Credit, End, Heartbeat, Resume, Role, ScoredBatch, Shutdown, TokenBatch};

/// The protocol version this crate speaks. A header whose `rho` field differs is refused.
pub const PROTOCOL_VERSION: u32 = 1;
