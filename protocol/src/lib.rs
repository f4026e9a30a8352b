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

#![warn(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod auth;
pub mod cache;
pub mod client;
mod codec;
pub mod config_file;
pub mod endpoint;
mod error;
pub mod fingerprint;
pub mod flow;
pub mod jsonl;
pub mod liveness;
pub mod lock;
pub mod messages;
pub mod producer;
pub mod splitmix;
pub mod tensorboard;
pub mod tokenizer;

pub use auth::Key;
pub use codec::{Limits, Message};
pub use endpoint::Endpoint;
pub use error::DecodeError;
pub use fingerprint::Fingerprint;
pub use liveness::Liveness;
pub use messages::{
    describe_differences, first_non_finite, Ack, Corpus, Credit, Difference, End, Heartbeat,
    Resume, Role, ScoredBatch, Shutdown, StreamIdentity, TokenBatch, STREAM_ITEMS,
};
pub use splitmix::{mix64, SplitMix64};

/// An error and its causes on one line, `outer: inner: ...` (for a message that is a string,
/// such as a config field's reason).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Milliseconds since the Unix epoch (0 on a clock set before it): heartbeats' `at_ms`.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The protocol version this crate speaks. A header whose `rho` field differs is refused.
pub const PROTOCOL_VERSION: u32 = 1;
