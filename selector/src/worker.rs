//! The selector process: token batches in (by credit, from the loader), scored batches out (by
//! credit, to the trainer of each batch's rank).
//!
//! Backpressure runs end to end and per rank: the selector asks the loader for a rank's batches
//! only as far as that rank's trainer has granted it credits (and at most `prefetch` ahead), so
//! no process buffers more than its consumer can take, and a slow rank holds back only its own.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::num::NonZeroUsize;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rho_common::cache::{CacheHeader, CacheWriter};
use rho_common::jsonl::JsonLines;
use rho_common::tensorboard::EventWriter;
use rho_protocol::client::{ClientError, Consumer};
use rho_protocol::{Fingerprint, Key, Limits, Message, Role, ScoredBatch, TokenBatch};

use crate::ranks::Ranks;
use crate::report::Report;
use tokio::task::{JoinError, JoinSet};

use crate::config::SelectorConfig;
use crate::scorer::{CandleScorer, Scorer};
use crate::{Result, SelectorError};

/// The tokenizer's fingerprint and vocabulary size.
pub fn tokenizer_identity(path: &Path) -> Result<(Fingerprint, usize)> {
    let err = |reason: String| SelectorError::Tokenizer {
        path: path.to_path_buf(),
        reason,
    };
    let t = rho_common::tokenizer::load(path).map_err(err)?;
    Ok((t.fingerprint, t.tokenizer.get_vocab_size(true)))
}

/// Loads the reference model of a config and checks it against the tokenizer.
pub fn load_scorer(config: &SelectorConfig) -> Result<(CandleScorer, Fingerprint)> {
    let model_err = |source| SelectorError::Model {
        path: config.model.clone(),
        source,
    };
    let (tokenizer, tokenizer_vocab) = tokenizer_identity(&config.tokenizer)?;
    let dtype = config.dtype.on(config.device).map_err(model_err)?;
    let device = config.device.open().map_err(model_err)?;
    let scorer = CandleScorer::load(
        &config.model,
        &device,
        dtype,
        config.loss_chunk.map(NonZeroUsize::get),
    )
    .map_err(model_err)?;
    if scorer.vocab_size() < tokenizer_vocab {
        return Err(SelectorError::VocabMismatch {
            model: config.model.clone(),
            model_vocab: scorer.vocab_size(),
            tokenizer: config.tokenizer.clone(),
            tokenizer_vocab,
        });
    }
    Ok((scorer, tokenizer))
}

struct Scored {
    /// The order the batch started scoring in (and is delivered in).
    order: u64,
    /// The lane it was scored in.
    lane: usize,
    batch: TokenBatch,
    arrived: Instant,
    started: Instant,
    result: std::result::Result<Vec<f32>, rho_model::ModelError>,
    secs: f64,
}

/// Runs a selector until the loader's stream ends (and everything received is delivered), the
/// trainer asks it to stop, or `shutdown` resolves.
pub async fn run(config: SelectorConfig, shutdown: impl Future<Output = ()>) -> Result<Report> {
    config.validate()?;
    let cfg = config.clone();
    let (scorer, tokenizer) = tokio::task::spawn_blocking(move || load_scorer(&cfg)).await??;
    let scorer: Arc<dyn Scorer> = Arc::new(scorer);
    tracing::info!(model = %config.model.display(), fingerprint = %scorer.fingerprint(), "reference model loaded");
    serve(config, scorer, tokenizer, shutdown).await
}

/// The selector loop around any [`Scorer`].
pub async fn serve(
    config: SelectorConfig,
    scorer: Arc<dyn Scorer>,
    tokenizer: Fingerprint,
    shutdown: impl Future<Output = ()>,
) -> Result<Report> {
    Selector::start(config, scorer, tokenizer)
        .await?
        .run(shutdown)
        .await
}

/// Whether the loop goes on after an event.
type Flow = ControlFlow<()>;

/// A selector process: its connections, the batches it holds and its credits. Each event of
/// the loop in [`Selector::run`] is one method.
pub struct Selector {
    config: SelectorConfig,
    scorer: Arc<dyn Scorer>,
    tokenizer: Fingerprint,
    loader: Consumer,
    /// The trainer of every rank, with its credits and outbox.
    ranks: Ranks,
    /// Batches received, waiting for the model.
    queue: VecDeque<(TokenBatch, Instant)>,
    /// The thread pool of each lane; none with one lane (the model uses the global pool).
    pools: Vec<Arc<rayon::ThreadPool>>,
    /// Lanes not scoring now.
    free: Vec<usize>,
    /// The batches being scored, at most one per lane.
    scoring: JoinSet<Scored>,
    /// Batches scored ahead of one started earlier, by start order (delivered in that order).
    finished: BTreeMap<u64, Scored>,
    /// The start order of the next batch to score, and of the next to deliver.
    next_start: u64,
    next_done: u64,
    /// The loader said the stream ended.
    ended: bool,
    cache: Option<CacheWriter>,
    metrics: Option<JsonLines>,
    /// TensorBoard event files of the scalars.
    events: Option<EventWriter>,
    progress: indicatif::ProgressBar,
    report: Report,
    started: Instant,
}

impl Selector {
    /// Connects to the trainers (introducing itself) and to the loader, and opens the metrics
    /// file and the scored cache when configured.
    pub async fn start(
        config: SelectorConfig,
        scorer: Arc<dyn Scorer>,
        tokenizer: Fingerprint,
    ) -> Result<Self> {
        let started = Instant::now();
        let pools = lane_pools(&config)?;
        let lanes = pools.len().max(1);
        let limits = Limits::with_max_message_bytes(config.max_message_bytes);
        let key = Key::from_config(config.secret_file.as_deref()).map_err(|reason| {
            SelectorError::ConfigField {
                field: "secret_file",
                reason,
            }
        })?;
        check_signed(&config, key.as_ref())?;
        let held = config.prefetch.get().saturating_add(lanes as u32 - 1);
        let run_id = &config.run_id;
        let ranks = Ranks::connect(&config.deliveries(), run_id, limits, key.clone(), held).await?;
        let loader =
            Consumer::connect_named("the loader", config.loader.as_str(), run_id, limits, key)
                .await?;
        tracing::info!(loader = %config.loader, ranks = ranks.world(), trainer = %config.deliveries()[0], "selector connected");
        let metrics =
            match &config.metrics {
                Some(p) => Some(JsonLines::open(p, false).map_err(|reason| {
                    SelectorError::ConfigField {
                        field: "metrics",
                        reason,
                    }
                })?),
                None => None,
            };
        let cache = open_cache(&config, &tokenizer, scorer.as_ref())?;
        let events = match &config.tensorboard {
            Some(dir) => Some(EventWriter::create(dir, None).map_err(|reason| {
                SelectorError::ConfigField {
                    field: "tensorboard",
                    reason,
                }
            })?),
            None => None,
        };
        let world = ranks.world();
        Ok(Selector {
            config,
            scorer,
            tokenizer,
            loader,
            ranks,
            queue: VecDeque::new(),
            free: (0..lanes).rev().collect(),
            pools,
            scoring: JoinSet::new(),
            finished: BTreeMap::new(),
            next_start: 0,
            next_done: 0,
            ended: false,
            cache,
            metrics,
            events,
            progress: indicatif::ProgressBar::new_spinner(),
            report: Report {
                lanes,
                batches_per_rank: vec![0; world],
                ..Report::default()
            },
            started,
        })
    }

    /// The loop: deliver what credits allow, ask the loader for more, start scoring, then wait
    /// for one event.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<Report> {
        tokio::pin!(shutdown);
        let every = Duration::from_secs_f64(self.config.metrics_interval_secs);
        let mut tick = tokio::time::interval(every);
        let mut beat = tokio::time::interval(self.config.liveness.every());
        loop {
            self.deliver().await;
            self.request_from_loader().await;
            if self.start_scoring()?.is_break() {
                break;
            }
            let flow = tokio::select! {
                _ = &mut shutdown => self.interrupted(),
                m = self.loader.recv() => self.on_loader(m)?,
                (r, m) = self.ranks.recv() => self.on_trainer(r, m)?,
                done = scored(&mut self.scoring) => self.on_scored(done)?,
                _ = beat.tick() => self.on_heartbeat(&mut shutdown).await?,
                _ = tick.tick() => self.on_metrics_tick(),
            };
            if flow.is_break() {
                break;
            }
        }
        self.report.wall_secs = self.started.elapsed().as_secs_f64();
        if let Some(f) = &mut self.metrics {
            f.append(&self.report.line(self.report.wall_secs));
        }
        self.progress.finish_and_clear();
        Ok(self.report)
    }

    fn interrupted(&mut self) -> Flow {
        self.report.interrupted = true;
        Flow::Break(())
    }

    /// Sends scored batches to each rank's trainer while it has granted credits.
    async fn deliver(&mut self) {
        for (r, d) in self.ranks.iter_mut().enumerate() {
            while d.credits.can_deliver() {
                let Some((scored, arrived)) = d.outbox.pop_front() else {
                    break;
                };
                if d.consumer.send(&scored).await.is_err() {
                    // The trainer is gone; the batch waits for the reconnection.
                    d.outbox.push_front((scored, arrived));
                    break;
                }
                d.credits.delivered();
                d.held = d.held.saturating_sub(1);
                self.report.batches += 1;
                self.report.batches_per_rank[r] += 1;
                self.report.latency_secs += arrived.elapsed().as_secs_f64();
            }
        }
    }

    /// Asks the loader for each rank's batches, as far as that rank's credits allow.
    async fn request_from_loader(&mut self) {
        if self.ended {
            return;
        }
        for r in 0..self.ranks.world() {
            let rank = self.ranks.credit_rank(r);
            let d = self.ranks.get_mut(r);
            let n = d.credits.request(d.held);
            if n > 0 && self.loader.credit_for(n, rank).await.is_err() {
                self.ranks.get_mut(r).credits.unrequest(n);
            }
        }
    }

    /// Starts scoring queued batches in the free lanes; `Break` when the stream ended and
    /// everything received has been delivered.
    fn start_scoring(&mut self) -> Result<Flow> {
        while !self.free.is_empty() {
            let Some((batch, arrived)) = self.queue.pop_front() else {
                break;
            };
            self.start_one(batch, arrived)?;
        }
        let done = self.ended
            && self.queue.is_empty()
            && self.scoring.is_empty()
            && self.finished.is_empty()
            && self.ranks.outboxes_empty();
        Ok(if done {
            Flow::Break(())
        } else {
            Flow::Continue(())
        })
    }

    /// Scores `batch` in a free lane.
    fn start_one(&mut self, batch: TokenBatch, arrived: Instant) -> Result<()> {
        if batch.tokenizer != self.tokenizer {
            return Err(SelectorError::TokenizerMismatch {
                seq: batch.seq,
                got: batch.tokenizer.to_string(),
                expected: self.tokenizer.to_string(),
                path: self.config.tokenizer.clone(),
            });
        }
        let scorer = self.scorer.clone();
        let lane = self.free.pop().expect("a free lane");
        let pool = self.pools.get(lane).cloned();
        let order = self.next_start;
        self.next_start += 1;
        self.scoring.spawn_blocking(move || {
            let started = Instant::now();
            let result = match pool {
                // The lane's share of the cores: candle's products and rho's kernels split
                // their work over the pool they run in.
                Some(pool) => pool.install(|| scorer.score(&batch)),
                None => scorer.score(&batch),
            };
            let secs = started.elapsed().as_secs_f64();
            Scored {
                order,
                lane,
                batch,
                arrived,
                started,
                result,
                secs,
            }
        });
        Ok(())
    }

    fn on_loader(&mut self, m: std::result::Result<Message, ClientError>) -> Result<Flow> {
        match m {
            Ok(Message::Batch(b)) if b.run_id == self.config.run_id => {
                let Some(r) = self.ranks.rank_of(&b) else {
                    let (seq, rank, world) = (b.seq, b.rank, self.ranks.world());
                    self.report.messages_rejected += 1;
                    tracing::warn!(
                        seq,
                        ?rank,
                        world,
                        "refused a batch for a rank this selector does not serve"
                    );
                    return Ok(Flow::Continue(()));
                };
                let d = self.ranks.get_mut(r);
                d.credits.arrived();
                d.held += 1;
                self.queue.push_back((b, Instant::now()));
            }
            Ok(Message::End(_)) => self.ended = true,
            Ok(Message::Shutdown(s)) if s.run_id == self.config.run_id => {
                return Err(SelectorError::LoaderRefused { reason: s.reason });
            }
            Ok(Message::Heartbeat(_)) => {}
            other => self.refuse("loader", other)?,
        }
        Ok(Flow::Continue(()))
    }

    /// A message from rank `r`'s trainer.
    fn on_trainer(
        &mut self,
        r: usize,
        m: std::result::Result<Message, ClientError>,
    ) -> Result<Flow> {
        match m {
            Ok(Message::Credit(c)) if c.run_id == self.config.run_id => {
                self.ranks.get_mut(r).credits.granted(c.n)
            }
            Ok(Message::Shutdown(s)) if s.run_id == self.config.run_id => {
                // Its batches in flight go back to the loader's leases.
                let endpoint = self.ranks.get_mut(r).endpoint.to_string();
                return Err(SelectorError::Stopped {
                    trainer: endpoint,
                    reason: s.reason,
                });
            }
            Ok(Message::Heartbeat(_)) => {}
            other => self.refuse("trainer", other)?,
        }
        Ok(Flow::Continue(()))
    }

    /// Counts and logs a message the selector does not take; a broken connection is an error.
    fn refuse(&mut self, from: &str, m: std::result::Result<Message, ClientError>) -> Result<()> {
        match m {
            Ok(other) => {
                self.report.messages_rejected += 1;
                tracing::warn!("refused a `{}` message from the {from}", other.kind());
                Ok(())
            }
            Err(ClientError::Decode(e)) => {
                self.report.messages_rejected += 1;
                tracing::warn!("refused a malformed message from the {from}: {e}");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A batch came back from the model; it and every batch it held up go, in the order they
    /// started, into the cache (when configured) and the outbox.
    fn on_scored(&mut self, done: std::result::Result<Scored, JoinError>) -> Result<Flow> {
        let done = done?;
        self.free.push(done.lane);
        self.finished.insert(done.order, done);
        while let Some(done) = self.finished.remove(&self.next_done) {
            self.next_done += 1;
            self.deliverable(done)?;
        }
        Ok(Flow::Continue(()))
    }

    /// A scored batch, in its turn: into the cache (when configured) and the outbox.
    fn deliverable(&mut self, done: Scored) -> Result<()> {
        let seq = done.batch.seq;
        // Checked on arrival (`on_loader`).
        let r = self.ranks.rank_of(&done.batch).unwrap_or(0);
        let ref_loss = done
            .result
            .map_err(|source| SelectorError::Scoring { seq, source })?;
        if let Some((row, position, value)) = rho_protocol::first_non_finite(&done.batch, &ref_loss)
        {
            return Err(SelectorError::NonFinite {
                seq,
                reference: self.scorer.fingerprint().to_string(),
                row,
                position,
                value,
            });
        }
        self.report.tokens += done.batch.target_count() as u64;
        self.report.score_secs += done.secs;
        self.report.queue_wait_secs += done.started.duration_since(done.arrived).as_secs_f64();
        let scored = Message::Scored(ScoredBatch {
            batch: done.batch,
            ref_model: self.scorer.fingerprint().clone(),
            ref_loss,
        });
        if let Some(w) = self.cache.as_mut() {
            tokio::task::block_in_place(|| w.append(&scored))?;
            self.report.cache_bytes = w.bytes;
        }
        self.ranks
            .get_mut(r)
            .outbox
            .push_back((scored, done.arrived));
        Ok(())
    }

    /// Heartbeats both ways; a peer silent for too long is connected to again. `Break` when
    /// `shutdown` came while reconnecting.
    async fn on_heartbeat<F: Future + Unpin>(&mut self, shutdown: &mut F) -> Result<Flow> {
        let _ = self.loader.heartbeat(Role::Selector).await;
        for d in self.ranks.iter_mut() {
            let _ = d.consumer.heartbeat(Role::Selector).await;
        }
        let timeout = self.config.liveness.timeout();
        if !self.ended && self.loader.silent_for() > timeout {
            if !self.loader.reconnect_or(&mut *shutdown).await? {
                return Ok(self.interrupted());
            }
            self.report.reconnects += 1;
            for d in self.ranks.iter_mut() {
                d.credits.loader_lost();
            }
            tracing::info!("reconnected to the loader");
        }
        for d in self.ranks.iter_mut() {
            if d.consumer.silent_for() <= timeout {
                continue;
            }
            if !d.consumer.reconnect_or(&mut *shutdown).await? {
                self.report.interrupted = true;
                return Ok(Flow::Break(()));
            }
            self.report.reconnects += 1;
            d.credits.trainer_lost();
            let _ = d.consumer.heartbeat(Role::Selector).await;
            tracing::info!(trainer = %d.endpoint, "reconnected to the trainer");
        }
        Ok(Flow::Continue(()))
    }

    fn on_metrics_tick(&mut self) -> Flow {
        let line = self.report.line(self.started.elapsed().as_secs_f64());
        if let Some(f) = &mut self.metrics {
            f.append(&line);
        }
        if let Some(e) = &mut self.events {
            // One point per interval, at the batches delivered so far.
            e.scalars(
                line.batches,
                &[
                    ("selector/tokens_per_s", line.tokens_per_s),
                    ("selector/idle_fraction", line.idle_fraction),
                    ("selector/mean_latency_ms", line.mean_latency_ms),
                    ("selector/mean_score_ms", line.mean_score_ms),
                ],
            );
        }
        self.progress.set_message(format!(
            "selector: {} batches, {:.0} tokens/s, queue {}, credits {}",
            self.report.batches,
            line.tokens_per_s,
            self.queue.len(),
            self.ranks.credits_down()
        ));
        self.progress.tick();
        Flow::Continue(())
    }
}

/// The next batch done scoring, in whatever lane; never, when none is being scored.
async fn scored(scoring: &mut JoinSet<Scored>) -> std::result::Result<Scored, JoinError> {
    match scoring.join_next().await {
        Some(done) => done,
        None => std::future::pending().await,
    }
}

/// The thread pools of the lanes that score at once, each with its share of the global pool's
/// threads; none for a single lane (it uses the global pool).
fn lane_pools(config: &SelectorConfig) -> Result<Vec<Arc<rayon::ThreadPool>>> {
    let on_cpu = config.device == rho_model::DeviceSpec::Cpu;
    let pools = rho_model::lanes::start(config.lanes, on_cpu, usize::MAX, "lane").map_err(|e| {
        SelectorError::ConfigField {
            field: "lanes",
            reason: format!("could not start the lanes' threads: {e}"),
        }
    })?;
    let (n, threads) = (pools.len().max(1), rayon::current_num_threads());
    if let Some(asked) = config.lanes.filter(|l| l.get() > n) {
        tracing::warn!(
            lanes = asked.get(),
            threads,
            "more lanes than threads: scoring in {n}"
        );
    }
    tracing::info!(lanes = n, threads, "scoring batches side by side");
    Ok(pools.into_iter().map(Arc::new).collect())
}

/// The scored cache this selector writes to, when `cache_out` is set.
fn open_cache(
    config: &SelectorConfig,
    tokenizer: &Fingerprint,
    scorer: &dyn Scorer,
) -> Result<Option<CacheWriter>> {
    let Some(dir) = &config.cache_out else {
        return Ok(None);
    };
    let header = CacheHeader {
        version: 1,
        run_id: config.run_id.clone(),
        tokenizer: tokenizer.clone(),
        ref_model: scorer.fingerprint().clone(),
    };
    let w = CacheWriter::create(dir, header)?;
    tracing::info!(file = %w.path().display(), "writing scored batches to the cache");
    Ok(Some(w))
}

/// Every endpoint this selector connects to beyond loopback needs the run's secret
/// ([`rho_protocol::Endpoint::check_secret`]); refused before anything is connected.
fn check_signed(config: &SelectorConfig, key: Option<&Key>) -> Result<()> {
    let refused = |field| move |reason| SelectorError::ConfigField { field, reason };
    config.loader.check_secret(key).map_err(refused("loader"))?;
    let field = match config.trainers.is_empty() {
        true => "trainer",
        false => "trainers",
    };
    for e in config.deliveries() {
        e.check_secret(key).map_err(refused(field))?;
    }
    Ok(())
}
