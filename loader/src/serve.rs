//! Serving batches over ZeroMQ: a ROUTER socket, credits, and the ledger of batches in flight.
//!
//! A batch goes to a consumer only against a credit that consumer sent; at most
//! `max_in_flight` batches are issued and unacknowledged at once; a batch whose delivery fails
//! (its consumer vanished) is handed to the next consumer that asks. A `resume` message restarts
//! the stream at the given sequence number.

use bytes::Bytes;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rho_protocol::flow::{AckOutcome, Credits, Ledger};
use rho_protocol::producer::{Incoming, Producer, ProducerError};
use rho_protocol::{End, Heartbeat, Limits, Message, Role};

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
    pub counts: Counts,
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
    Failed(String),
}

/// Where batches come from: the tokenizing stream, or a cache of scored batches.
pub enum Source {
    Tokens(Box<Stream>),
    Cache(rho_protocol::cache::CacheReader),
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

type Peer = Bytes;

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
                Err(e) => Produced::Failed(e.to_string()),
            };
            let _ = tx.send(last);
        })
        .expect("spawning the producer thread");
    rx
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Binds the endpoint and serves `stream` until it is exhausted and acknowledged (with
/// `exit_when_done`), a shutdown message arrives, or `shutdown` resolves.
pub async fn serve(
    config: &LoaderConfig,
    stream: Source,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<Report> {
    let started = Instant::now();
    let limits = Limits::with_max_message_bytes(config.max_message_bytes);
    let key = rho_protocol::Key::from_config(config.secret_file.as_deref()).map_err(|reason| {
        LoaderError::ConfigField {
            field: "secret_file",
            reason,
        }
    })?;
    let mut socket = Producer::bind(
        &config.endpoint,
        config.endpoint_file.as_deref(),
        &config.run_id,
        limits,
        key.clone(),
    )
    .await
    .map_err(|e| match e {
        ProducerError::EndpointFile { path, source } => LoaderError::Io { path, source },
        other => LoaderError::Transport(other.to_string()),
    })?;
    let endpoint = socket.endpoint().to_string();
    tracing::info!(%endpoint, "loader listening");

    let (world, rank) = (u64::from(config.world), u64::from(config.rank));
    let local_of = move |seq: u64| seq.saturating_sub(rank).div_ceil(world);
    let start_local = local_of(config.start_batch);
    let end_seq = move |total_local: u64| {
        if total_local == 0 {
            0
        } else {
            (total_local - 1) * world + rank + 1
        }
    };
    let stream = Arc::new(Mutex::new(stream));
    let mut producer = spawn_producer(stream.clone(), start_local, config.prefetch);

    let mut credits: Credits<Peer> = Credits::default();
    // Everyone who spoke to this loader hears the `end` (a trainer that only acknowledges, too).
    let mut peers: std::collections::HashSet<Peer> = std::collections::HashSet::new();
    let mut ledger: Ledger<Vec<Bytes>, Peer> = Ledger::new(config.max_in_flight);
    let mut pending: VecDeque<u64> = VecDeque::new();
    let mut total: Option<u64> = None;
    let mut reporter =
        Reporter::new(config.metrics.as_deref()).map_err(|reason| LoaderError::ConfigField {
            field: "metrics",
            reason,
        })?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(config.metrics_interval_secs));
    let run_id = config.run_id.clone();
    let end_frames = |total: u64| {
        Message::End(End {
            run_id: run_id.clone(),
            total,
        })
        .encode_with(key.as_ref())
    };
    tokio::pin!(shutdown);
    let mut interrupted = false;

    loop {
        // Redeliveries first: they are already in the ledger and need no room.
        while credits.any() && !pending.is_empty() {
            let (Some(seq), Some(peer)) = (pending.pop_front(), credits.take()) else {
                break;
            };
            let Some(frames) = ledger.reissue(seq, peer.clone(), Instant::now()).cloned() else {
                continue;
            };
            Metrics::add(&metrics.redeliveries, 1);
            if socket.send_frames(&peer, &frames).await.is_err() {
                credits.forget(&peer);
                pending.push_front(seq);
            } else {
                Metrics::add(&metrics.batches_sent, 1);
            }
        }
        Metrics::set(&metrics.in_flight, ledger.len() as u64);
        if let Some(t) = total {
            if ledger.is_empty() && pending.is_empty() && config.exit_when_done {
                // Tell every peer, then give the sends a moment to flush.
                credits.drain();
                for peer in &peers {
                    let _ = socket.send_frames(peer, &end_frames(t)).await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                break;
            }
        }
        let want_new = credits.any() && ledger.has_room() && total.is_none();
        tokio::select! {
            _ = &mut shutdown => {
                interrupted = true;
                break;
            }
            incoming = socket.recv() => {
                let Some(incoming) = incoming else { break };
                Metrics::set(&metrics.messages_rejected, socket.refused());
                let Incoming::Message { peer, message } = incoming else { continue };
                peers.insert(peer.clone());
                match message {
                    Message::Credit(c) => {
                        // `end` only once nothing is in flight: until then a consumer with
                        // credit may still be needed for a redelivery.
                        if let Some(t) = total.filter(|_| pending.is_empty() && ledger.is_empty()) {
                            let _ = socket.send_frames(&peer, &end_frames(t)).await;
                        } else {
                            credits.grant(peer, c.n);
                        }
                    }
                    Message::Ack(a) => {
                        for seq in a.seqs {
                            match ledger.ack(seq) {
                                AckOutcome::Done => Metrics::add(&metrics.batches_acked, 1),
                                AckOutcome::Unknown => Metrics::add(&metrics.unknown_acks, 1),
                            }
                            pending.retain(|&s| s != seq);
                        }
                    }
                    Message::Heartbeat(_) => {
                        let reply = Message::Heartbeat(Heartbeat { run_id: config.run_id.clone(), role: Role::Loader, at_ms: now_ms() });
                        let _ = socket.send(&peer, &reply).await;
                    }
                    Message::Resume(r) => {
                        let local = local_of(r.next_seq);
                        tracing::info!(next_seq = r.next_seq, "resuming the stream at the consumer's cursor");
                        producer = spawn_producer(stream.clone(), local, config.prefetch);
                        ledger.forget_below(u64::MAX);
                        pending.clear();
                        total = None;
                    }
                    Message::Shutdown(s) => {
                        tracing::info!(reason = %s.reason, "shutdown requested by a peer");
                        interrupted = true;
                        break;
                    }
                    other => {
                        socket.refuse(peer, &format!("a `{}` message: a loader does not take those", other.kind()));
                        Metrics::set(&metrics.messages_rejected, socket.refused());
                    }
                }
            }
            item = producer.recv_async(), if want_new => {
                match item {
                    Ok(Produced::Item(seq, message)) => {
                        let Some(peer) = credits.take() else { continue };
                        let frames = message.encode_with(key.as_ref());
                        let sent = socket.send_frames(&peer, &frames).await;
                        ledger.issue(seq, frames, peer.clone(), Instant::now());
                        if sent.is_err() {
                            credits.forget(&peer);
                            pending.push_back(seq);
                        } else {
                            Metrics::add(&metrics.batches_sent, 1);
                        }
                    }
                    Ok(Produced::End { total_local }) => {
                        let t = end_seq(total_local);
                        tracing::info!(total = t, "stream exhausted");
                        total = Some(t);
                    }
                    Ok(Produced::Failed(reason)) => {
                        reporter.finish(&metrics.snapshot());
                        return Err(LoaderError::Transport(format!("the stream failed: {reason}")));
                    }
                    Err(_) => {
                        // The producer was replaced by a resume; the new one is polled next turn.
                    }
                }
            }
            _ = tick.tick() => {
                // Leases: a batch out for too long goes to the next consumer that asks.
                let lease = Duration::from_secs_f64(config.lease_secs);
                for seq in ledger.expired(Instant::now(), lease) {
                    if !pending.contains(&seq) {
                        tracing::warn!(seq, "lease expired; the batch will be handed out again");
                        pending.push_back(seq);
                    }
                }
                reporter.report(&metrics.snapshot());
            }
        }
    }
    let counts = metrics.snapshot();
    reporter.finish(&counts);
    Ok(Report {
        endpoint,
        total,
        counts,
        wall_secs: started.elapsed().as_secs_f64(),
        interrupted,
    })
}
