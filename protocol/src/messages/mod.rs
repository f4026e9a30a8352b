//! The message types, one file each: data messages carry tensors, control messages a header only.

mod batch;
mod control;
mod scored;
mod stream;

pub use batch::TokenBatch;
pub use control::{Ack, Credit, End, Heartbeat, Rank, Resume, Role, Shutdown};
pub use scored::{first_non_finite, ScoredBatch};
pub use stream::{describe_differences, Corpus, Difference, StreamIdentity, STREAM_ITEMS};
