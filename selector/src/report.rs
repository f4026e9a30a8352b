//! What a selector did: its report at the end and its metrics lines on the way.

/// What a selector did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Scored batches delivered to the trainers.
    pub batches: u64,
    /// Of those, delivered to each rank's trainer (one entry with one trainer).
    #[serde(default)]
    pub batches_per_rank: Vec<u64>,
    /// Valid target positions scored.
    pub tokens: u64,
    /// Seconds from start to stop.
    pub wall_secs: f64,
    /// Time spent in the model, summed over the lanes.
    pub score_secs: f64,
    /// Batches scored at once (the config's `lanes`, as resolved).
    #[serde(default)]
    pub lanes: usize,
    /// Time batches waited between arrival and scoring, summed.
    pub queue_wait_secs: f64,
    /// Time from a batch's arrival to its delivery, summed.
    pub latency_secs: f64,
    /// Messages refused (malformed, of another run, unsigned).
    pub messages_rejected: u64,
    /// Connections dropped and made again because a peer fell silent.
    pub reconnects: u64,
    /// Bytes written to the scored cache (`cache_out`).
    pub cache_bytes: u64,
    /// Stopped by a signal or by the trainer before the stream ended.
    pub interrupted: bool,
}

/// One line of the selector's metrics file: totals so far, written every
/// `metrics_interval_secs` and once at the end.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct SelectorMetrics {
    /// Seconds since the selector started.
    pub elapsed_s: f64,
    /// Scored batches delivered.
    pub batches: u64,
    /// Valid target positions scored.
    pub tokens: u64,
    /// `tokens` over `elapsed_s`.
    pub tokens_per_s: f64,
    /// Mean time in the model per batch.
    pub mean_score_ms: f64,
    /// Mean time from a batch's arrival to its delivery.
    pub mean_latency_ms: f64,
    /// Mean time a batch waited for the model.
    pub mean_queue_wait_ms: f64,
    /// Fraction of the lanes' wall time not spent scoring.
    pub idle_fraction: f64,
    /// Messages refused so far.
    pub messages_rejected: u64,
}

impl Report {
    pub(crate) fn line(&self, elapsed: f64) -> SelectorMetrics {
        let n = self.batches.max(1) as f64;
        SelectorMetrics {
            elapsed_s: elapsed,
            batches: self.batches,
            tokens: self.tokens,
            tokens_per_s: self.tokens as f64 / elapsed.max(1e-9),
            mean_score_ms: self.score_secs / n * 1e3,
            mean_latency_ms: self.latency_secs / n * 1e3,
            mean_queue_wait_ms: self.queue_wait_secs / n * 1e3,
            idle_fraction: 1.0 - self.score_secs / (elapsed.max(1e-9) * self.lanes.max(1) as f64),
            messages_rejected: self.messages_rejected,
        }
    }
}
