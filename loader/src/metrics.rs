//! The loader's counters, named in one place, and their JSONL and terminal reports.

use rho_common::tensorboard::EventWriter;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Live counters, shared by the reading, tokenizing and serving threads.
        #[derive(Debug, Default)]
        pub struct Metrics { $($(#[$doc])* pub $name: AtomicU64,)* }

        /// A point-in-time copy of [`Metrics`].
        #[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
        pub struct Counts { $($(#[$doc])* pub $name: u64,)* }

        impl Metrics {
            /// The counters now.
            pub fn snapshot(&self) -> Counts {
                Counts { $($name: self.$name.load(Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Documents tokenized.
    docs,
    /// Tokens produced (BOS/EOS included).
    tokens,
    /// Bytes of document text read.
    text_bytes,
    /// Documents cut into pieces because they exceed `max_doc_bytes`.
    docs_chunked,
    /// Rows skipped: null or missing text.
    rows_no_text,
    /// Rows skipped: invalid UTF-8.
    rows_bad_utf8,
    /// Rows skipped: a JSON line that does not parse or is not an object.
    rows_bad_json,
    /// Rows skipped: empty or whitespace-only text.
    docs_empty,
    /// Shards read to the end.
    shards_read,
    /// Shards, or parts of shards, that could not be read (missing, truncated, corrupt).
    shards_damaged,
    /// Windows packed.
    windows,
    /// Batches assembled.
    batches_produced,
    /// Batches sent (redeliveries included).
    batches_sent,
    /// Batches sent again after a failed delivery.
    redeliveries,
    /// Batches acknowledged.
    batches_acked,
    /// Acknowledgements for batches not in flight.
    unknown_acks,
    /// Messages refused: malformed, oversized or of another run.
    messages_rejected,
    /// Batches in flight now (gauge).
    in_flight,
}

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Sets a gauge.
    pub fn set(counter: &AtomicU64, n: u64) {
        counter.store(n, Relaxed);
    }
}

impl Counts {
    /// Rows skipped for any reason.
    pub fn skipped(&self) -> u64 {
        self.rows_no_text + self.rows_bad_utf8 + self.rows_bad_json + self.docs_empty
    }
}

/// Writes one JSON line per interval: counters and rates since start.
pub struct Reporter {
    file: Option<rho_common::jsonl::JsonLines>,
    events: Option<EventWriter>,
    start: Instant,
    progress: indicatif::ProgressBar,
}

/// One line of the loader's metrics file: the counters so far and the rates since the start.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LoaderMetrics {
    /// Seconds since the loader started.
    pub elapsed_s: f64,
    /// The counters (written inline).
    #[serde(flatten)]
    pub counts: Counts,
    /// Documents read per second since the start.
    pub docs_per_s: f64,
    /// Tokens per second since the start.
    pub tokens_per_s: f64,
    /// Megabytes of text per second since the start.
    pub mb_per_s: f64,
}

impl Reporter {
    /// The error names the metrics file.
    pub fn new(path: Option<&Path>, tensorboard: Option<&Path>) -> Result<Self, String> {
        let file = match path {
            Some(p) => Some(rho_common::jsonl::JsonLines::open(p, false)?),
            None => None,
        };
        let events = match tensorboard {
            Some(dir) => Some(EventWriter::create(dir, None)?),
            None => None,
        };
        let progress = indicatif::ProgressBar::new_spinner();
        progress.set_style(
            indicatif::ProgressStyle::with_template("{spinner} loader {elapsed} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        Ok(Reporter {
            file,
            events,
            start: Instant::now(),
            progress,
        })
    }

    /// Writes a metrics line and shows the progress line.
    pub fn report(&mut self, counts: &Counts) {
        let elapsed = self.start.elapsed().as_secs_f64().max(1e-9);
        let line = LoaderMetrics {
            elapsed_s: elapsed,
            counts: counts.clone(),
            docs_per_s: counts.docs as f64 / elapsed,
            tokens_per_s: counts.tokens as f64 / elapsed,
            mb_per_s: counts.text_bytes as f64 / elapsed / 1e6,
        };
        if let Some(f) = &mut self.file {
            f.append(&line);
        }
        if let Some(e) = &mut self.events {
            // One point per interval, at the batches sent so far.
            e.scalars(
                counts.batches_sent,
                &[
                    ("loader/tokens_per_s", line.tokens_per_s),
                    ("loader/in_flight", counts.in_flight as f64),
                    ("loader/redeliveries", counts.redeliveries as f64),
                    ("loader/messages_rejected", counts.messages_rejected as f64),
                ],
            );
        }
        self.progress.set_message(format!(
            "docs {} | tokens {} ({:.0}/s, {:.1} MB/s) | batches sent {} acked {} in flight {} | skipped {} damaged {}",
            counts.docs,
            counts.tokens,
            line.tokens_per_s,
            line.mb_per_s,
            counts.batches_sent,
            counts.batches_acked,
            counts.in_flight,
            counts.skipped(),
            counts.shards_damaged,
        ));
        self.progress.tick();
    }

    /// The last line, and the progress line cleared.
    pub fn finish(&mut self, counts: &Counts) {
        self.report(counts);
        self.progress.finish_and_clear();
    }
}
