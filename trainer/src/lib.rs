//! The rho trainer: consumes scored batches in sequence order (a bounded reorder buffer, with
//! duplicates dropped), computes its own per-token loss through a differentiable model path,
//! keeps the top-k% tokens by excess loss (`L_theta - L_ref`), steps the optimizer on the mean
//! loss of the selected tokens, acknowledges batches to the loader, and checkpoints model,
//! optimizer and stream cursor together. Backends (candle, a null consumer) sit behind one trait.
//!
//! Not built yet: this crate holds the plan and the dependency edges of DESIGN.md
//! (`rho-protocol` + `rho-model`).

pub use rho_model as model;
pub use rho_protocol as protocol;
