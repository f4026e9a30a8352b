//! The rho trainer: consumes scored batches in sequence order, computes its own per-token loss
//! through a differentiable model path, keeps the top-k% tokens by excess loss
//! (`L_theta - L_ref`), steps the optimizer on the mean loss of the selected tokens,
//! acknowledges batches to the loader, and checkpoints model, optimizer and stream cursor
//! together. Backends (candle, a null consumer) sit behind [`Backend`].

#![warn(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod admission;
pub mod backend;
pub mod candle_backend;
pub mod checkpoint;
pub mod config;
mod error;
pub mod metrics;
pub mod optim;
pub mod run;
pub mod selection;

pub use backend::{Backend, NullBackend, StepInput, StepStats};
pub use candle_backend::{CandleBackend, StepGradients};
pub use config::TrainerConfig;
pub use error::{Result, TrainerError};
pub use metrics::StepMetrics;
pub use run::{run, Report, Trainer};
pub use selection::{RatioSchedule, Scope, ScoreRule, Selection};
