//! The rho selector: pulls token batches from the loader by credit, runs the frozen reference
//! model over each (the `rho-model` fused inference path), attaches the reference loss `L_ref`
//! of every target position (f32 `[B, T]`), stamps the reference-model fingerprint, and
//! delivers the scored batch to the trainer. It keeps no state that matters: any number of
//! selectors can work against one loader and one trainer.
//!
//! At start-up it refuses a reference model whose vocabulary is smaller than the tokenizer's;
//! it refuses to score a batch whose tokenizer fingerprint is not its tokenizer's.

#![warn(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod config;
pub mod credits;
mod error;
mod ranks;
pub mod report;
pub mod scorer;
pub mod worker;

pub use config::SelectorConfig;
pub use credits::Credits;
pub use error::{Result, SelectorError};
pub use report::{Report, SelectorMetrics};
pub use scorer::{CandleScorer, Scorer};
pub use worker::{run, Selector};
