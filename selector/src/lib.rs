//! The rho selector: pulls token batches from the loader by credit, runs the frozen reference
//! model over each (the `rho-model` inference path, fused ops allowed), attaches the reference
//! loss `L_ref` of every target position (f32 `[B, T]`), stamps the reference-model
//! fingerprint, and pushes the scored batch to the trainer. It keeps no state that matters:
//! any number of selectors can join or leave a run at any time.
//!
//! Not built yet: this crate holds the plan and the dependency edges of DESIGN.md
//! (`rho-protocol` + `rho-model`).

pub use rho_model as model;
pub use rho_protocol as protocol;
