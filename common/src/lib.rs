//! What every rho process does the same way off the wire: reading its config file
//! ([`config_file`]: the error names the file and the field), loading a tokenizer
//! ([`tokenizer`]), owning a directory ([`lock`]), writing its records (JSON-lines metrics,
//! [`jsonl`]; TensorBoard events, [`tensorboard`]), the scored cache ([`cache`]) and seeded
//! randomness ([`splitmix`]).
//!
//! The wire itself (messages, codec, both ends of a connection, flow control) is `rho-protocol`,
//! which depends on nothing of ours; this crate depends on it only for the types a cache record
//! and a tokenizer's fingerprint share with the wire. The loader, the selector, the trainer and
//! the binary use both.

#![warn(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod cache;
pub mod config_file;
pub mod jsonl;
pub mod lock;
pub mod splitmix;
pub mod tensorboard;
pub mod tokenizer;

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
