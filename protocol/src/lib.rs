//! The rho wire protocol: the messages that the loader, the selectors and the trainer exchange,
//! their codec, and the flow-control and acknowledgement primitives they share: both ends of a
//! connection ([`client::Consumer`], [`producer::Producer`]), credits, the in-flight ledger and
//! the reorder buffer ([`flow`]), signing ([`auth`]) and liveness ([`liveness`]). This crate is
//! the wire and nothing else: what the processes do the same way off the wire (config files,
//! tokenizer loading, the run-directory lock, metrics records, the scored cache) is `rho-common`.
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
pub mod client;
mod codec;
pub mod endpoint;
mod error;
pub mod fingerprint;
pub mod flow;
pub mod liveness;
pub mod messages;
pub mod producer;

pub use auth::Key;
pub use codec::{Limits, Message};
pub use endpoint::{Endpoint, Reach};
pub use error::DecodeError;
pub use fingerprint::Fingerprint;
pub use liveness::Liveness;
pub use messages::{
    describe_differences, first_non_finite, Ack, Corpus, Credit, Difference, End, Heartbeat, Rank,
    Resume, Role, ScoredBatch, Shutdown, StreamIdentity, TokenBatch, STREAM_ITEMS,
};

/// Milliseconds since the Unix epoch (0 on a clock set before it): heartbeats' `at_ms`.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The protocol version this crate speaks. A header whose `rho` field differs is refused.
pub const PROTOCOL_VERSION: u32 = 1;
