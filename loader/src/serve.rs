//! Serving batches over ZeroMQ: a ROUTER socket, credits, and the ledger of batches in flight.
//!
//! A batch goes to a consumer only against a credit that consumer sent; at most
//! `max_in_flight` batches are issued and unacknowledged at once; a batch whose delivery fails
//! (its consumer vanished) is handed to the next consumer that asks. A `resume` message restarts
//! the stream at the given sequence number.

use bytes::Bytes;
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rho_protocol::flow::{AckOutcome, Credits, Ledger};
use rho_protocol::producer::{Incoming, Peer, Producer, ProducerError};
use rho_protocol::{End, Heartbeat, Key, Limits, Message, Resume, Role, Shutdown, StreamIdentity};

use crate::config::LoaderConfig;
use crate::metrics::{Counts, Metrics, Reporter};
use crate::stream::{Flow, Stream};
use crate::{LoaderError, Result};

/// What a loader did, returned when it stops.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// The endpoint it was bound to.
    pub endpoint: String,
    /// Batches in the stream (one past the last sequence number), once the stream was exhausted.
    pub total: Option<u64>,
    /// The counters at the end.
    pub counts: Counts,
    /// Seconds from start to stop.
    pub wall_secs: f64,
    /// Whether it stopped on a signal or a shutdown message rather than by finishing.
    pub interrupted: bool,
}

enum Produced {
    /// A `batch`, or a `scored` batch from a cache, with its sequence number.
    Item(u64, Box<Message>),
    End {
        total_local: u64,
    },
    Failed(LoaderError),
}

/// Where batches come from: the tokenizing stream, or a cache of scored batches.
pub enum Source {
    /// Tokenized and packed from shards.
    Tokens(Box<Stream>),
    /// Scored batches read back from a cache.
    Cache(rho_common::cache::CacheReader),
}

impl Source {
    fn run(
        &mut self,
        start: u64,
        emit: &mut dyn FnMut(Message, u64) -> Flow,
    ) -> Result<Option<u64>> {
        match self {
            Source::Tokens(stream) => stream.run(start, |batch| {
                let seq = batch.seq;
                emit(Message::Batch(batch), seq)
            }),
            Source::Cache(cache) => {
                let total = cache.contiguous();
                for seq in start..total {
                    let scored = cache.read(seq)?;
                    if emit(Message::Scored(scored), seq) == Flow::Stop {
                        return Ok(None);
                    }
                }
                Ok(Some(total))
            }
        }
    }
}

fn spawn_producer(
    stream: Arc<Mutex<Source>>,
    start: u64,
    prefetch: usize,
) -> flume::Receiver<Produced> {
    let (tx, rx) = flume::bounded(prefetch);
    std::thread::Builder::new()
        .name("rho-producer".into())
        .spawn(move || {
            let mut stream = stream.lock().unwrap_or_else(|e| e.into_inner());
            let result = stream.run(start, &mut |message, seq| {
                if tx.send(Produced::Item(seq, Box::new(message))).is_ok() {
                    Flow::Continue
                } else {
                    Flow::Stop
                }
            });
            let last = match result {
                Ok(Some(total_local)) => Produced::End { total_local },
                Ok(None) => return,
                Err(e) => Produced::Failed(e),
            };
            let _ = tx.send(last);
        })
        .expect("spawning the producer thread");
    rx
}

/// Binds the endpoint and serves `stream` until it is exhausted and acknowledged (with
/// `exit_when_done`), a shutdown message arrives, or `shutdown` resolves.
pub async fn serve(
    config: &LoaderConfig,
    stream: Source,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<Report> {
    Loader::start(config, stream, metrics)
        .await?
        .run(shutdown)
        .await
}

/// Whether the loop goes on after an event.
type Step = std::ops::ControlFlow<()>;

/// Where this rank's batches sit in the whole stream: rank `r` of `world` serves the sequence
/// numbers `r, r + world, r + 2 world, ...`, which its source counts locally as `0, 1, 2, ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RankStride {
    world: u64,
    rank: u64,
}

impl RankStride {
    /// The local position of the first of this rank's sequence numbers at or after `seq`.
    pub(crate) fn local_of(self, seq: u64) -> u64 {
        seq.saturating_sub(self.rank).div_ceil(self.world)
    }

    /// One past the last sequence number of a rank whose source yielded `total_local` batches.
    pub(crate) fn end_seq(self, total_local: u64) -> u64 {
        match total_local {
            0 => 0,
            n => (n - 1) * self.world + self.rank + 1,
        }
    }
}

/// A loader process: its socket, the producer thread feeding it, the consumers' credits and
/// the ledger of batches in flight. Each event of the loop in [`Loader::run`] is one method.
pub struct Loader {
    config: LoaderConfig,
    socket: Producer,
    key: Option<Key>,
    stride: RankStride,
    source: Arc<Mutex<Source>>,
    producer: flume::Receiver<Produced>,
    metrics: Arc<Metrics>,
    reporter: Reporter,
    credits: Credits<Peer>,
    /// Everyone who spoke to this loader hears the `end` (a trainer that only acknowledges, too).
    peers: HashSet<Peer>,
    ledger: Ledger<Vec<Bytes>, Peer>,
    /// Batches to hand out again (their consumer vanished or their lease expired).
    pending: VecDeque<u64>,
    /// The stream's length, once the source is exhausted.
    total: Option<u64>,
    interrupted: bool,
    started: Instant,
    /// What shapes the stream this loader issues (none for a scored cache, whose batches carry
    /// the identity of the stream they were scored from).
    identity: Option<StreamIdentity>,
}

impl Loader {
    /// Binds the endpoint (and writes the endpoint file) and starts the producer thread at
    /// `start_batch`.
    pub async fn start(
        config: &LoaderConfig,
        source: Source,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let started = Instant::now();
        let limits = Limits::with_max_message_bytes(config.max_message_bytes);
        let key = Key::from_config(config.secret_file.as_deref()).map_err(|reason| {
            LoaderError::ConfigField {
                field: "secret_file",
                reason,
            }
        })?;
        let socket = Producer::bind(
            config.endpoint.as_str(),
            config.endpoint_file.as_deref(),
            &config.run_id,
            limits,
            key.clone(),
        )
        .await
        .map_err(|e| match e {
            ProducerError::EndpointFile { path, source } => LoaderError::Io { path, source },
            other => other.into(),
        })?;
        tracing::info!(endpoint = %socket.endpoint(), "loader listening");
        let reporter = Reporter::new(config.metrics.as_deref(), config.tensorboard.as_deref())
            .map_err(|reason| LoaderError::ConfigField {
                field: "metrics",
                reason,
            })?;
        let stride = RankStride {
            world: u64::from(config.world.get()),
            rank: u64::from(config.rank),
        };
        let identity = match &source {
            Source::Tokens(stream) => Some(stream.identity().clone()),
            Source::Cache(_) => None,
        };
        let source = Arc::new(Mutex::new(source));
        let start = stride.local_of(config.start_batch);
        Ok(Loader {
            producer: spawn_producer(source.clone(), start, config.prefetch.get()),
            ledger: Ledger::new(config.max_in_flight.get()),
            config: config.clone(),
            socket,
            key,
            stride,
            source,
            metrics,
            reporter,
            credits: Credits::default(),
            peers: HashSet::new(),
            pending: VecDeque::new(),
            total: None,
            interrupted: false,
            started,
            identity,
        })
    }

    /// The loop: redeliver what is pending, stop once everything is acknowledged (with
    /// `exit_when_done`), then wait for one event.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<Report> {
        tokio::pin!(shutdown);
        let every = Duration::from_secs_f64(self.config.metrics_interval_secs);
        let mut tick = tokio::time::interval(every);
        loop {
            self.redeliver().await;
            Metrics::set(&self.metrics.in_flight, self.ledger.len() as u64);
            if self.config.exit_when_done && self.all_acknowledged().is_some() {
                self.say_end_to_all().await;
                break;
            }
            let want_new = self.credits.any() && self.ledger.has_room() && self.total.is_none();
            let flow = tokio::select! {
                _ = &mut shutdown => self.interrupt(),
                incoming = self.socket.recv() => self.on_message(incoming).await,
                item = self.producer.recv_async(), if want_new => self.on_produced(item).await?,
                _ = tick.tick() => self.on_tick(),
            };
            if flow.is_break() {
                break;
            }
        }
        let counts = self.metrics.snapshot();
        self.reporter.finish(&counts);
        Ok(Report {
            endpoint: self.socket.endpoint().to_string(),
            total: self.total,
            counts,
            wall_secs: self.started.elapsed().as_secs_f64(),
            interrupted: self.interrupted,
        })
    }

    fn interrupt(&mut self) -> Step {
        self.interrupted = true;
        Step::Break(())
    }

    /// The stream's length, once it is exhausted and nothing is in flight or pending.
    fn all_acknowledged(&self) -> Option<u64> {
        self.total
            .filter(|_| self.ledger.is_empty() && self.pending.is_empty())
    }

    fn end_frames(&self, total: u64) -> Vec<Bytes> {
        let end = Message::End(End {
            run_id: self.config.run_id.clone(),
            total,
        });
        end.encode_with(self.key.as_ref())
    }

    /// Tells every peer the stream ended, then gives the sends a moment to flush.
    async fn say_end_to_all(&mut self) {
        let Some(total) = self.total else { return };
        self.credits.drain();
        let frames = self.end_frames(total);
        for peer in &self.peers {
            let _ = self.socket.send_frames(peer, &frames).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    /// Redeliveries first: they are already in the ledger and need no room.
    async fn redeliver(&mut self) {
        while self.credits.any() && !self.pending.is_empty() {
            let (Some(seq), Some(peer)) = (self.pending.pop_front(), self.credits.take()) else {
                break;
            };
            let now = Instant::now();
            let Some(frames) = self.ledger.reissue(seq, peer.clone(), now).cloned() else {
                continue;
            };
            Metrics::add(&self.metrics.redeliveries, 1);
            if self.socket.send_frames(&peer, &frames).await.is_err() {
                self.credits.forget(&peer);
                self.pending.push_front(seq);
            } else {
                Metrics::add(&self.metrics.batches_sent, 1);
            }
        }
    }

    /// A message from a consumer: credit, acknowledgement, heartbeat, resume or shutdown.
    async fn on_message(&mut self, incoming: Option<Incoming>) -> Step {
        let Some(incoming) = incoming else {
            return Step::Break(());
        };
        Metrics::set(&self.metrics.messages_rejected, self.socket.refused());
        let Incoming::Message { peer, message } = incoming else {
            return Step::Continue(());
        };
        self.peers.insert(peer.clone());
        match message {
            Message::Credit(c) => self.on_credit(peer, c.n).await,
            Message::Ack(a) => self.on_ack(&a.seqs),
            Message::Heartbeat(_) => {
                let reply = Message::Heartbeat(Heartbeat {
                    run_id: self.config.run_id.clone(),
                    role: Role::Loader,
                    at_ms: rho_protocol::now_ms(),
                });
                let _ = self.socket.send(&peer, &reply).await;
            }
            Message::Resume(r) => self.on_resume(peer, r).await,
            Message::Shutdown(s) => {
                tracing::info!(reason = %s.reason, "shutdown requested by a peer");
                return self.interrupt();
            }
            other => {
                let why = format!("a `{}` message: a loader does not take those", other.kind());
                self.socket.refuse(peer, &why);
                Metrics::set(&self.metrics.messages_rejected, self.socket.refused());
            }
        }
        Step::Continue(())
    }

    /// `end` only once nothing is in flight: until then a consumer with credit may still be
    /// needed for a redelivery.
    async fn on_credit(&mut self, peer: Peer, n: u32) {
        match self.all_acknowledged() {
            Some(total) => {
                let frames = self.end_frames(total);
                let _ = self.socket.send_frames(&peer, &frames).await;
            }
            None => self.credits.grant(peer, n),
        }
    }

    fn on_ack(&mut self, seqs: &[u64]) {
        for &seq in seqs {
            match self.ledger.ack(seq) {
                AckOutcome::Done => Metrics::add(&self.metrics.batches_acked, 1),
                AckOutcome::Unknown => Metrics::add(&self.metrics.unknown_acks, 1),
            }
            self.pending.retain(|&s| s != seq);
        }
    }

    /// Restarts the stream at a consumer's cursor: what was in flight is forgotten.
    /// A consumer's cursor: the stream restarts there, unless the cursor names a stream that
    /// is not this loader's (then the consumer is told why, with every differing item, and
    /// nothing moves).
    async fn on_resume(&mut self, peer: Peer, r: Resume) {
        let next_seq = r.next_seq;
        if let (Some(theirs), Some(mine)) = (&r.stream, &self.identity) {
            let differences = theirs.differences(mine);
            if !differences.is_empty() {
                let reason = format!(
                    "cannot resume at batch {next_seq}: the cursor belongs to another stream ({}); resume only on the stream it was trained on, accept the change where the consumer allows it (a trainer's `accept_stream_changes`), or start a new run",
                    rho_protocol::describe_differences(&differences, "in the cursor's stream", "in this loader's")
                );
                tracing::error!("{reason}");
                self.socket
                    .refuse(peer.clone(), "a resume of another stream");
                Metrics::set(&self.metrics.messages_rejected, self.socket.refused());
                let stop = Message::Shutdown(Shutdown {
                    run_id: self.config.run_id.clone(),
                    reason,
                });
                let _ = self.socket.send(&peer, &stop).await;
                return;
            }
        }
        let local = self.stride.local_of(next_seq);
        tracing::info!(next_seq, "resuming the stream at the consumer's cursor");
        self.producer = spawn_producer(self.source.clone(), local, self.config.prefetch.get());
        self.ledger.forget_below(u64::MAX);
        self.pending.clear();
        self.total = None;
    }

    /// The next item of the producer thread: a batch for a consumer with credit, the end of
    /// the stream, or the stream's failure.
    async fn on_produced(
        &mut self,
        item: std::result::Result<Produced, flume::RecvError>,
    ) -> Result<Step> {
        match item {
            Ok(Produced::Item(seq, message)) => {
                let Some(peer) = self.credits.take() else {
                    return Ok(Step::Continue(()));
                };
                let frames = message.encode_with(self.key.as_ref());
                let sent = self.socket.send_frames(&peer, &frames).await;
                self.ledger.issue(seq, frames, peer.clone(), Instant::now());
                if sent.is_err() {
                    self.credits.forget(&peer);
                    self.pending.push_back(seq);
                } else {
                    Metrics::add(&self.metrics.batches_sent, 1);
                }
            }
            Ok(Produced::End { total_local }) => {
                let total = self.stride.end_seq(total_local);
                tracing::info!(total, "stream exhausted");
                self.total = Some(total);
            }
            Ok(Produced::Failed(e)) => {
                self.reporter.finish(&self.metrics.snapshot());
                return Err(LoaderError::Stream(Box::new(e)));
            }
            // The producer was replaced by a resume; the new one is polled next turn.
            Err(_) => {}
        }
        Ok(Step::Continue(()))
    }

    /// Leases: a batch out for too long goes to the next consumer that asks. And a metrics line.
    fn on_tick(&mut self) -> Step {
        let lease = Duration::from_secs_f64(self.config.lease_secs);
        for seq in self.ledger.expired(Instant::now(), lease) {
            if !self.pending.contains(&seq) {
                tracing::warn!(seq, "lease expired; the batch will be handed out again");
                self.pending.push_back(seq);
            }
        }
        self.reporter.report(&self.metrics.snapshot());
        Step::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::RankStride;

    #[test]
    fn ranks_map_the_global_stream_to_their_local_positions_and_back() {
        let s = RankStride { world: 3, rank: 1 };
        // Rank 1 of 3 serves 1, 4, 7, ...
        assert_eq!(s.local_of(0), 0);
        assert_eq!(s.local_of(1), 0);
        assert_eq!(s.local_of(2), 1);
        assert_eq!(s.local_of(4), 1);
        assert_eq!(s.local_of(5), 2);
        assert_eq!(s.end_seq(0), 0);
        assert_eq!(s.end_seq(1), 2);
        assert_eq!(s.end_seq(3), 8);
        let one = RankStride { world: 1, rank: 0 };
        assert_eq!(one.local_of(7), 7);
        assert_eq!(one.end_seq(7), 7);
    }
}
