//! Serving batches over ZeroMQ: a ROUTER socket, credits, and the ledger of batches in flight.
//!
//! A batch goes to a consumer only against a credit that consumer sent; at most
//! `max_in_flight` batches are issued and unacknowledged at once; a batch whose delivery fails
//! (its consumer vanished) is handed to the next consumer that asks. A `resume` message restarts
//! the stream at the given sequence number (and, naming its rank, the ranks' split at its global
//! cursor: [`crate::RankStride`]).
//!
//! A loader of every rank (`rank` unset, `world` > 1) keeps these per rank: a batch waits in
//! its rank's queue for a credit for that rank, and each rank has its
//! own `max_in_flight`, so a rank whose consumers are slow holds back no more than its own
//! window and its queue (`prefetch` batches) before the stream waits for it.

use bytes::Bytes;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rho_protocol::flow::{AckOutcome, Credits, Ledger};
use rho_protocol::producer::{Incoming, Peer, Producer, ProducerError};
use rho_protocol::{
    End, Heartbeat, Key, Limits, Message, Rank, Resume, Role, Shutdown, StreamIdentity,
};

use crate::config::{LoaderConfig, RankStride};
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
    /// Issues the stream split among the ranks as `stride` says, from the source's `start`-th
    /// batch on (see [`Stream::run_split`]).
    fn run(
        &mut self,
        stride: RankStride,
        start: u64,
        emit: &mut dyn FnMut(Message, u64) -> Flow,
    ) -> Result<Option<u64>> {
        match self {
            Source::Tokens(stream) => stream.run_split(stride, start, |batch| {
                let seq = batch.seq;
                emit(Message::Batch(batch), seq)
            }),
            Source::Cache(cache) => {
                // Every rank gets the same number of batches: of the batches from the origin
                // on, the last `(contiguous - origin) % world` are not served.
                let contiguous = cache.contiguous();
                let total = stride.group_start(contiguous.max(stride.origin));
                if total < contiguous {
                    tracing::info!(
                        dropped = contiguous - total,
                        world = stride.world,
                        "the cache's last batches do not make a batch for every rank: not served"
                    );
                }
                for seq in start.max(stride.origin)..total {
                    let mut scored = cache.read(seq)?;
                    scored.batch.rank = stride.rank_tag(seq);
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
    stride: RankStride,
    start: u64,
    prefetch: usize,
) -> flume::Receiver<Produced> {
    let (tx, rx) = flume::bounded(prefetch);
    std::thread::Builder::new()
        .name("rho-producer".into())
        .spawn(move || {
            let mut stream = stream.lock().unwrap_or_else(|e| e.into_inner());
            let result = stream.run(stride, start, &mut |message, seq| {
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
    /// Credits, by queue: one pool per rank for a loader of every rank, else the one.
    credits: Vec<Credits<Peer>>,
    /// Batches made and not yet handed out, by queue (one per rank for a loader of every rank,
    /// else one).
    ready: Vec<VecDeque<(u64, Box<Message>)>>,
    /// Batches issued and unacknowledged, by queue.
    in_flight: Vec<usize>,
    /// Everyone who spoke to this loader hears the `end` (a trainer that only acknowledges, too).
    peers: HashSet<Peer>,
    /// The selectors (peers that said so in a heartbeat), with when each was last heard.
    selectors: HashMap<Peer, Instant>,
    ledger: Ledger<Vec<Bytes>, Peer>,
    /// Batches to hand out again (their consumer vanished or their lease expired).
    pending: VecDeque<u64>,
    /// Where the stream last (re)started, and whether a batch was acknowledged since: the ranks
    /// of one data-parallel run each send the same resume, and only the first moves the stream.
    restarted_at: u64,
    acked_since_restart: bool,
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
            config.advertise.as_deref(),
            config.endpoint_file.as_deref(),
            &config.run_id,
            limits,
            key.clone(),
        )
        .await
        .map_err(|e| match e {
            ProducerError::EndpointFile { path, source } => LoaderError::Io { path, source },
            ProducerError::Unsigned { reason, .. } => LoaderError::ConfigField {
                field: "endpoint",
                reason,
            },
            other => other.into(),
        })?;
        tracing::info!(endpoint = %socket.endpoint(), "loader listening");
        let reporter = Reporter::new(config.metrics.as_deref(), config.tensorboard.as_deref())
            .map_err(|reason| LoaderError::ConfigField {
                field: "metrics",
                reason,
            })?;
        let stride = config.stride();
        let queues = match stride.rank {
            Some(_) => 1,
            None => config.world.get() as usize,
        };
        let identity = match &source {
            Source::Tokens(stream) => Some(stream.identity().clone()),
            Source::Cache(_) => None,
        };
        let source = Arc::new(Mutex::new(source));
        let start = stride.local_of(config.start_batch);
        Ok(Loader {
            producer: spawn_producer(source.clone(), stride, start, config.prefetch.get()),
            ledger: Ledger::new(config.max_in_flight.get() * queues),
            config: config.clone(),
            socket,
            key,
            stride,
            source,
            metrics,
            reporter,
            credits: (0..queues).map(|_| Credits::default()).collect(),
            ready: (0..queues).map(|_| VecDeque::new()).collect(),
            in_flight: vec![0; queues],
            peers: HashSet::new(),
            selectors: HashMap::new(),
            pending: VecDeque::new(),
            restarted_at: config.start_batch,
            acked_since_restart: false,
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
            self.dispatch().await;
            Metrics::set(&self.metrics.in_flight, self.ledger.len() as u64);
            if self.config.exit_when_done && self.all_acknowledged().is_some() {
                self.say_end_to_all().await;
                break;
            }
            let want_new = self.total.is_none() && self.ready_has_room();
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

    /// The stream's length, once it is exhausted and nothing is in flight, pending or ready.
    fn all_acknowledged(&self) -> Option<u64> {
        self.total.filter(|_| {
            self.ledger.is_empty()
                && self.pending.is_empty()
                && self.ready.iter().all(VecDeque::is_empty)
        })
    }

    /// The queue of sequence number `seq`: its rank's for a loader of every rank, else the one.
    fn queue_of(&self, seq: u64) -> usize {
        match self.ready.len() {
            1 => 0,
            _ => self.stride.rank_of(seq) as usize,
        }
    }

    /// A consumer with a credit for queue `q`'s batches.
    fn take_credit(&mut self, q: usize) -> Option<Peer> {
        self.credits[q].take()
    }

    fn has_credit(&self, q: usize) -> bool {
        self.credits[q].any()
    }

    /// A consumer that vanished: none of its credits stay.
    fn forget_credits(&mut self, peer: &Peer) {
        for c in &mut self.credits {
            c.forget(peer);
        }
    }

    /// Whether the producer thread's next batch has somewhere to wait: every queue below its
    /// bound (one batch for a loader of one rank, `prefetch` per rank for a loader of all).
    fn ready_has_room(&self) -> bool {
        let bound = match self.ready.len() {
            1 => 1,
            _ => self.config.prefetch.get(),
        };
        self.ready.iter().all(|q| q.len() < bound)
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
        for c in &mut self.credits {
            c.drain();
        }
        let frames = self.end_frames(total);
        for peer in &self.peers {
            let _ = self.socket.send_frames(peer, &frames).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    /// Redeliveries first: they are already in the ledger and need no room. A batch whose rank
    /// has no credit now waits in `pending`, in its place.
    async fn redeliver(&mut self) {
        let mut waiting = VecDeque::new();
        while let Some(seq) = self.pending.pop_front() {
            let q = self.queue_of(seq);
            let Some(peer) = self.take_credit(q) else {
                waiting.push_back(seq);
                continue;
            };
            let now = Instant::now();
            let Some(frames) = self.ledger.reissue(seq, peer.clone(), now).cloned() else {
                continue;
            };
            Metrics::add(&self.metrics.redeliveries, 1);
            if self.socket.send_frames(&peer, &frames).await.is_err() {
                self.forget_credits(&peer);
                waiting.push_back(seq);
            } else {
                Metrics::add(&self.metrics.batches_sent, 1);
            }
        }
        self.pending = waiting;
    }

    /// Hands out the batches that are ready, each queue while it has a credit and room.
    async fn dispatch(&mut self) {
        for q in 0..self.ready.len() {
            while !self.ready[q].is_empty()
                && self.in_flight[q] < self.config.max_in_flight.get()
                && self.has_credit(q)
            {
                let (Some((seq, message)), Some(peer)) =
                    (self.ready[q].pop_front(), self.take_credit(q))
                else {
                    break;
                };
                let frames = message.encode_with(self.key.as_ref());
                let sent = self.socket.send_frames(&peer, &frames).await;
                self.ledger.issue(seq, frames, peer.clone(), Instant::now());
                self.in_flight[q] += 1;
                if sent.is_err() {
                    self.forget_credits(&peer);
                    self.pending.push_back(seq);
                } else {
                    Metrics::add(&self.metrics.batches_sent, 1);
                }
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
        if let Some(heard) = self.selectors.get_mut(&peer) {
            *heard = Instant::now();
        }
        match message {
            Message::Credit(c) => self.on_credit(peer, c.n, c.rank).await,
            Message::Ack(a) => self.on_ack(&a.seqs),
            Message::Heartbeat(h) => {
                if h.role == Role::Selector {
                    self.selectors.insert(peer.clone(), Instant::now());
                }
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

    /// A credit names the rank it asks for, or none: a loader of one rank (or of a one-rank
    /// run) takes credits for that rank or unnamed; a loader of every rank of a larger run
    /// takes only named ones, each into its rank's pool, since a consumer asking for "any
    /// batch" would mix the ranks. A credit of another rank or another world is refused with
    /// the reason. Once everything is acknowledged, the answer is `end`.
    async fn on_credit(&mut self, peer: Peer, n: u32, rank: Option<Rank>) {
        if let Some(total) = self.all_acknowledged() {
            let frames = self.end_frames(total);
            let _ = self.socket.send_frames(&peer, &frames).await;
            return;
        }
        let (own, world) = (self.stride.rank, self.stride.world);
        let serves = match own {
            Some(own) => format!("rank {own} of {world}"),
            None => format!("every rank of {world}"),
        };
        let why = match rank {
            None if own.is_some() || world == 1 => return self.credits[0].grant(peer, n),
            None => format!("a credit without a rank: this loader serves {serves}; a consumer names the rank it trains (`rank`, `world`)"),
            Some(r) if u64::from(r.world) != world => {
                format!("a credit for {r}: this loader serves {serves}")
            }
            Some(r) if world == 1 || own == Some(u64::from(r.rank)) => {
                return self.credits[0].grant(peer, n)
            }
            Some(r) if own.is_none() => return self.credits[r.rank as usize].grant(peer, n),
            Some(r) => format!("a credit for {r}: this loader serves {serves}"),
        };
        // A consumer asking the wrong loader waits for nothing: it is told why, and stops.
        self.stop_consumer(peer, "a credit of another rank", why)
            .await;
    }

    /// Refuses a consumer's message (`what`, counted) and tells the consumer to stop, with
    /// the reason.
    async fn stop_consumer(&mut self, peer: Peer, what: &str, reason: String) {
        tracing::error!("{reason}");
        self.socket.refuse(peer.clone(), what);
        Metrics::set(&self.metrics.messages_rejected, self.socket.refused());
        let stop = Message::Shutdown(Shutdown {
            run_id: self.config.run_id.clone(),
            reason,
        });
        let _ = self.socket.send(&peer, &stop).await;
    }

    fn on_ack(&mut self, seqs: &[u64]) {
        for &seq in seqs {
            match self.ledger.ack(seq) {
                AckOutcome::Done => {
                    Metrics::add(&self.metrics.batches_acked, 1);
                    let q = self.queue_of(seq);
                    self.in_flight[q] = self.in_flight[q].saturating_sub(1);
                    self.acked_since_restart = true;
                }
                AckOutcome::Unknown => Metrics::add(&self.metrics.unknown_acks, 1),
            }
            self.pending.retain(|&s| s != seq);
        }
    }

    /// A consumer's cursor: the stream restarts there, unless the cursor names a stream that
    /// is not this loader's, or a rank or world it does not serve (then the consumer is told
    /// why and nothing moves). What was in flight is forgotten.
    async fn on_resume(&mut self, peer: Peer, r: Resume) {
        let checked = match self.other_stream(&r) {
            Some(why) => Err((why, "a resume of another stream")),
            None => self
                .resumed_split(&r)
                .map_err(|why| (why, "a resume of another rank")),
        };
        let (stride, start) = match checked {
            Ok(split) => split,
            Err((reason, what)) => return self.stop_consumer(peer, what, reason).await,
        };
        // The ranks of a data-parallel run step together, so each resumes at the same group
        // (the same origin): the same group again, before anything was acknowledged, is
        // another rank of the same resume. The stream stays, and the rank's batches in flight
        // are handed out again at once (their holder may be gone).
        if stride.rank.is_none()
            && stride.world > 1
            && stride == self.stride
            && start == self.restarted_at
            && !self.acked_since_restart
        {
            let rank = stride.rank_of(r.next_seq);
            for seq in self.ledger.seqs() {
                if stride.rank_of(seq) == rank && !self.pending.contains(&seq) {
                    self.pending.push_back(seq);
                }
            }
            tracing::info!(
                next_seq = r.next_seq,
                rank,
                "a rank resumed at the stream's cursor"
            );
            return;
        }
        tracing::info!(
            next_seq = stride.seq_of(start),
            origin = stride.origin,
            world = stride.world,
            "resuming the stream at the consumer's cursor"
        );
        self.stride = stride;
        self.producer = spawn_producer(
            self.source.clone(),
            stride,
            start,
            self.config.prefetch.get(),
        );
        self.ledger.forget_below(u64::MAX);
        self.pending.clear();
        self.ready.iter_mut().for_each(VecDeque::clear);
        self.in_flight.iter_mut().for_each(|n| *n = 0);
        self.total = None;
        self.restarted_at = start;
        self.acked_since_restart = false;
    }

    /// Why a resume's cursor is not of this loader's stream, with every differing item.
    fn other_stream(&self, r: &Resume) -> Option<String> {
        let (theirs, mine) = (r.stream.as_ref()?, self.identity.as_ref()?);
        let differences = theirs.differences(mine);
        (!differences.is_empty()).then(|| {
            format!(
                "cannot resume at batch {}: the cursor belongs to another stream ({}); resume only on the stream it was trained on, accept the change where the consumer allows it (a trainer's `accept_stream_changes`), or start a new run",
                r.next_seq,
                rho_protocol::describe_differences(&differences, "in the cursor's stream", "in this loader's")
            )
        })
    }

    /// The split a resume restarts, and where the source starts in it. A resume naming its
    /// rank restarts the split at its global cursor, `next_seq - rank` (which is how a run
    /// resumes on another number of ranks); one without keeps the split's alignment: a loader
    /// of every rank restarts at the start of the cursor's group, a loader of one rank at its
    /// first batch at or after the cursor. A rank or world this loader does not serve is refused
    /// with the reason.
    fn resumed_split(&self, r: &Resume) -> std::result::Result<(RankStride, u64), String> {
        let (stride, next_seq) = (self.stride, r.next_seq);
        let Some(rank) = r.rank else {
            return Ok(match stride.rank {
                Some(_) => (stride, stride.local_of(next_seq)),
                None => (stride, stride.group_start(next_seq)),
            });
        };
        let serves = match stride.rank {
            Some(own) => format!("rank {own} of {}", stride.world),
            None => format!("every rank of {}", stride.world),
        };
        if u64::from(rank.world) != stride.world {
            return Err(format!(
                "a resume of {rank}: this loader serves {serves}; a run resumed on {} ranks needs a loader of that `world` (`rho run` sets it from the ranks)",
                rank.world
            ));
        }
        if stride.rank.is_some_and(|own| own != u64::from(rank.rank)) {
            return Err(format!("a resume of {rank}: this loader serves {serves}"));
        }
        let Some(origin) = next_seq.checked_sub(u64::from(rank.rank)) else {
            return Err(format!(
                "a resume of {rank} at batch {next_seq}: a rank's cursor is at least its rank (the global cursor plus the rank)"
            ));
        };
        let split = stride.with_origin(origin);
        Ok((split, split.local_of(origin)))
    }

    /// The next item of the producer thread: a batch for a consumer with credit, the end of
    /// the stream, or the stream's failure.
    async fn on_produced(
        &mut self,
        item: std::result::Result<Produced, flume::RecvError>,
    ) -> Result<Step> {
        match item {
            Ok(Produced::Item(seq, message)) => {
                let q = self.queue_of(seq);
                self.ready[q].push_back((seq, message));
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

    /// A selector silent for `selector_timeout_secs` is presumed dead: the batches it holds are
    /// handed out again now rather than when their leases run out (a late delivery of one is a
    /// duplicate the trainer drops), and so is any handed to it while it stays silent. Its
    /// credits stay: a send to a peer that is gone fails and forgets them, a hung one uses them
    /// up, and one that was only slow keeps being served.
    fn requeue_silent_selectors(&mut self) {
        let timeout = Duration::from_secs_f64(self.config.selector_timeout_secs);
        let now = Instant::now();
        let silent: Vec<Peer> = self
            .selectors
            .iter()
            .filter(|(_, heard)| now.saturating_duration_since(**heard) > timeout)
            .map(|(peer, _)| peer.clone())
            .collect();
        for peer in silent {
            let held: Vec<u64> = self
                .ledger
                .held_by(&peer)
                .into_iter()
                .filter(|s| !self.pending.contains(s))
                .collect();
            if !held.is_empty() {
                tracing::warn!(
                    batches = held.len(),
                    first = held[0],
                    "a selector fell silent for {:.0} s; its batches are handed out again",
                    timeout.as_secs_f64()
                );
            }
            self.pending.extend(held);
        }
    }

    /// Leases: a batch out for too long goes to the next consumer that asks; silent selectors'
    /// batches likewise. And a metrics line.
    fn on_tick(&mut self) -> Step {
        let lease = Duration::from_secs_f64(self.config.lease_secs);
        for seq in self.ledger.expired(Instant::now(), lease) {
            if !self.pending.contains(&seq) {
                tracing::warn!(seq, "lease expired; the batch will be handed out again");
                self.pending.push_back(seq);
            }
        }
        self.requeue_silent_selectors();
        self.reporter.report(&self.metrics.snapshot());
        Step::Continue(())
    }
}
