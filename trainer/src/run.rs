//! The trainer process: batches in sequence order (from selectors, or from the loader directly
//! when the score rule needs no reference), one optimizer step per batch, acknowledgements to the
//! loader, evaluation, checkpoints and per-step metrics.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use rho_common::jsonl::JsonLines;
use rho_common::tensorboard::EventWriter;
use rho_protocol::client::{ClientError, Consumer};
use rho_protocol::flow::{Inserted, Reorder};
use rho_protocol::producer::{Incoming, Peer, Producer, ProducerError};
use rho_protocol::{Credit, Heartbeat, Key, Limits, Message, Role, Shutdown, TokenBatch};
use serde::{Deserialize, Serialize};

use crate::admission::Admission;
use crate::backend::{Backend, NullBackend, StepInput, StepStats};
use crate::candle_backend::CandleBackend;
use crate::checkpoint::{Checkpoints, TrainerState};
use crate::config::{BackendChoice, TrainerConfig};
use crate::metrics::StepMetrics;
use crate::{Result, TrainerError};

/// One evaluation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalPoint {
    /// Steps taken when evaluated.
    pub step: u64,
    /// Valid target tokens trained on by then.
    pub tokens: u64,
    /// Mean loss over every valid held-out token.
    pub loss: f32,
}

/// What a trainer did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Steps taken (resumed ones included).
    pub steps: u64,
    /// The stream cursor at the end.
    pub next_seq: u64,
    /// Valid target tokens trained on (all steps of this run, resumed ones included).
    pub tokens: u64,
    /// Sequence numbers trained on by this process, in order.
    pub consumed: Vec<u64>,
    /// Held-out evaluations, in order.
    pub evals: Vec<EvalPoint>,
    /// Batches received again after they were trained on or buffered (dropped).
    pub duplicates: u64,
    /// Messages refused (malformed, of another run, unsigned, unexpected).
    pub messages_rejected: u64,
    /// Scored batches refused (another reference model, or reference losses that are not
    /// finite); their selectors were told to stop, and the batches were scored again.
    #[serde(default)]
    pub reference_refused: u64,
    /// Times the loader fell silent and was connected to again.
    pub reconnects: u64,
    /// Seconds from start to stop.
    pub wall_secs: f64,
    /// Fraction of wall time spent waiting for the next batch.
    pub data_wait_fraction: f64,
    /// The last checkpoint written.
    pub last_checkpoint: Option<std::path::PathBuf>,
    /// Stopped by a signal before the stream ended.
    pub interrupted: bool,
}

/// Whether a process loop goes on after an event.
type Flow = ControlFlow<()>;

/// Runs a trainer until the stream ends (or `max_steps`), or `shutdown` resolves; checkpoints
/// at the end either way when checkpoints are configured.
pub async fn run(
    config: TrainerConfig,
    eval_batches: Vec<TokenBatch>,
    shutdown: impl Future<Output = ()>,
) -> Result<Report> {
    Trainer::start(config, eval_batches)
        .await?
        .run(shutdown)
        .await
}

/// Wall-clock accounting: time spent waiting for batches between steps.
#[derive(Debug)]
struct Clock {
    started: Instant,
    waited: Duration,
    last_step_end: Instant,
}

impl Clock {
    fn new() -> Self {
        let now = Instant::now();
        Clock {
            started: now,
            waited: Duration::ZERO,
            last_step_end: now,
        }
    }

    fn wait_fraction(&self) -> f64 {
        self.waited.as_secs_f64() / self.started.elapsed().as_secs_f64().max(1e-9)
    }
}

/// A trainer process: its model, its connections and the stream position. Each event of the
/// loop in [`Trainer::run`] is one method.
pub struct Trainer {
    config: TrainerConfig,
    run_id: String,
    backend: Box<dyn Backend>,
    eval_batches: Vec<TokenBatch>,
    state: TrainerState,
    /// What a batch must be to be taken (one reference, finite scores, the checkpoint's stream).
    admission: Admission,
    checkpoints: Option<Checkpoints>,
    loader: Consumer,
    /// Where selectors deliver scored batches; `None` when batches come from the loader.
    delivery: Option<Producer>,
    metrics: Option<JsonLines>,
    /// TensorBoard event files of the scalars.
    events: Option<EventWriter>,
    progress: indicatif::ProgressBar,
    report: Report,
    /// Batches by sequence number, handed to training in order from the stream cursor.
    buffer: Reorder<StepInput>,
    /// Selectors whose credit waits for room in the reorder buffer.
    owed: VecDeque<Peer>,
    /// Selectors that introduced themselves (each got its first credits).
    known: HashSet<Peer>,
    /// Batches asked of the loader and not yet received (without selectors).
    requested: u64,
    /// The stream's length, once the loader said it.
    total: Option<u64>,
    clock: Clock,
}

impl Trainer {
    /// Builds the backend, takes the checkpoint directory (resuming from it when asked), binds
    /// the delivery endpoint and connects to the loader.
    pub async fn start(config: TrainerConfig, eval_batches: Vec<TokenBatch>) -> Result<Self> {
        config.validate()?;
        let clock = Clock::new();
        let cfg = config.clone();
        let mut backend = tokio::task::spawn_blocking(move || build_backend(&cfg)).await??;
        let (checkpoints, state, resumed) = open_checkpoints(&config, backend.as_mut())?;
        let admission = Admission::new(
            config.selection.reference_fingerprint.clone(),
            config.selection.change_reference,
            resumed.map(|dir| (dir, state.stream.clone())),
        )?
        .accepting(&config.accept_stream_changes);
        let limits = Limits::with_max_message_bytes(config.max_message_bytes);
        let key = Key::from_config(config.secret_file.as_deref()).map_err(|reason| {
            TrainerError::ConfigField {
                field: "secret_file",
                reason,
            }
        })?;
        for (field, e, used) in [
            ("delivery", &config.delivery, config.uses_selectors()),
            ("loader", &config.loader, true),
        ] {
            if used {
                e.check_secret(key.as_ref())
                    .map_err(|reason| TrainerError::ConfigField { field, reason })?;
            }
        }
        let delivery = match config.uses_selectors() {
            true => Some(bind_delivery(&config, limits, key.clone()).await?),
            false => None,
        };
        // The delivery endpoint is bound (or refused) first: connecting waits for the loader.
        tracing::info!(loader = %config.loader, "connecting to the loader");
        let mut loader = Consumer::connect_named(
            "the loader",
            config.loader.as_str(),
            &config.run_id,
            limits,
            key,
        )
        .await?;
        if state.next_seq > 0 {
            loader
                .resume(state.next_seq, admission.cursor_stream(), None)
                .await?;
        }
        // A resumed run continues its metrics file; a fresh one starts it empty.
        let metrics = match &config.metrics {
            Some(p) => Some(JsonLines::open(p, state.step > 0).map_err(|reason| {
                TrainerError::ConfigField {
                    field: "metrics",
                    reason,
                }
            })?),
            None => None,
        };
        let resumed_at = (state.step > 0).then_some(state.step);
        let events = match &config.tensorboard {
            Some(dir) => Some(EventWriter::create(dir, resumed_at).map_err(|reason| {
                TrainerError::ConfigField {
                    field: "tensorboard",
                    reason,
                }
            })?),
            None => None,
        };
        Ok(Trainer {
            run_id: config.run_id.clone(),
            buffer: Reorder::new(state.next_seq, config.reorder_window.get()),
            config,
            backend,
            eval_batches,
            state,
            admission,
            checkpoints,
            loader,
            delivery,
            metrics,
            events,
            progress: indicatif::ProgressBar::new_spinner(),
            report: Report::default(),
            owed: VecDeque::new(),
            known: HashSet::new(),
            requested: 0,
            total: None,
            clock,
        })
    }

    /// The loop: train on whatever is next in sequence, ask for more, then wait for one event.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<Report> {
        tokio::pin!(shutdown);
        let mut beat = tokio::time::interval(self.config.liveness.every());
        if self.state.step == 0 {
            self.evaluate()?;
        }
        loop {
            if self.train_ready().await?.is_break() || self.stream_done() {
                break;
            }
            self.request_from_loader().await;
            let flow = tokio::select! {
                _ = &mut shutdown => self.interrupted(),
                m = self.loader.recv() => self.on_loader(m)?,
                _ = beat.tick() => self.on_heartbeat(&mut shutdown).await?,
                m = next_delivery(self.delivery.as_mut()) => self.on_delivery(m).await?,
            };
            if flow.is_break() {
                break;
            }
        }
        self.finish().await
    }

    fn interrupted(&mut self) -> Flow {
        self.report.interrupted = true;
        Flow::Break(())
    }

    fn stream_done(&self) -> bool {
        self.total.is_some_and(|t| self.state.next_seq >= t)
    }

    /// Trains on every batch that is next in sequence; `Break` once the run's step count
    /// reaches `max_steps` (a global step: a run resumed at step 50 with `max_steps` 80 takes 30
    /// more steps, and one resumed at or past it takes none).
    async fn train_ready(&mut self) -> Result<Flow> {
        let reached = |step: u64, max: Option<u64>| max.is_some_and(|m| step >= m);
        if reached(self.state.step, self.config.max_steps) {
            return Ok(Flow::Break(()));
        }
        while let Some(input) = self.buffer.pop() {
            self.train(input).await?;
            if reached(self.state.step, self.config.max_steps) {
                return Ok(Flow::Break(()));
            }
        }
        Ok(Flow::Continue(()))
    }

    /// One optimizer step on `input`, then its acknowledgement, evaluation, checkpoint and
    /// metrics.
    async fn train(&mut self, input: StepInput) -> Result<()> {
        self.clock.waited += self.clock.last_step_end.elapsed();
        let t0 = Instant::now();
        let (step, selection) = (self.state.step, &self.config.selection);
        let backend = &mut self.backend;
        let stats = tokio::task::block_in_place(|| backend.step(step, &input, selection))?;
        let step_secs = t0.elapsed().as_secs_f64();
        let seq = input.batch.seq;
        if let Err(e) = self.loader.ack(vec![seq]).await {
            // The loader is away; its lease will hand the batch out again, and a duplicate is
            // dropped here.
            tracing::warn!(seq, "could not acknowledge: {e}");
        }
        if let (Some(d), Some(peer)) = (self.delivery.as_mut(), self.owed.pop_front()) {
            let _ = d.send(&peer, &credit(&self.run_id, 1)).await;
        }
        self.report.consumed.push(seq);
        self.state.step += 1;
        // The cursor is the reorder buffer's: it moved past the batch just popped.
        self.state.next_seq = self.buffer.next();
        self.state.tokens += stats.tokens;
        let every = self.config.eval.as_ref().map(|e| e.every);
        let eval_loss = match every.is_some_and(|e| self.state.step.is_multiple_of(e.get())) {
            true => self.evaluate()?,
            false => None,
        };
        let every = self.config.checkpoint.as_ref().and_then(|c| c.every);
        if every.is_some_and(|e| self.state.step.is_multiple_of(e)) {
            self.checkpoint()?;
        }
        self.record(seq, &stats, step_secs, eval_loss);
        self.clock.last_step_end = Instant::now();
        Ok(())
    }

    /// Writes the step's metrics line and shows the progress line.
    fn record(&mut self, seq: u64, stats: &StepStats, step_secs: f64, eval_loss: Option<f32>) {
        let line = StepMetrics {
            step: self.state.step,
            seq,
            elapsed_s: self.clock.started.elapsed().as_secs_f64(),
            stats: stats.clone(),
            tokens_per_s: stats.tokens as f64 / step_secs.max(1e-9),
            data_wait_fraction: self.clock.wait_fraction(),
            eval_loss,
            duplicates: self.report.duplicates,
            reference_refused: self.report.reference_refused,
        };
        if let Some(f) = &mut self.metrics {
            f.append(&line);
        }
        if let Some(e) = &mut self.events {
            e.scalars(line.step, &line.scalars());
        }
        self.progress.set_message(line.progress_line());
        self.progress.tick();
    }

    /// The held-out loss now (recorded in the report), when there are held-out batches.
    fn evaluate(&mut self) -> Result<Option<f32>> {
        if self.eval_batches.is_empty() {
            return Ok(None);
        }
        let (backend, batches) = (&mut self.backend, &self.eval_batches);
        let loss = tokio::task::block_in_place(|| backend.eval(batches))?;
        self.report.evals.push(EvalPoint {
            step: self.state.step,
            tokens: self.state.tokens,
            loss,
        });
        Ok(Some(loss))
    }

    fn checkpoint(&mut self) -> Result<()> {
        self.state.stream = self.admission.seen().clone();
        if let Some(ck) = self.checkpoints.as_mut() {
            let (backend, state) = (self.backend.as_ref(), &self.state);
            self.report.last_checkpoint =
                Some(tokio::task::block_in_place(|| ck.save(backend, state))?);
        }
        Ok(())
    }

    /// Without selectors, keeps `prefetch` batches asked of the loader or buffered.
    async fn request_from_loader(&mut self) {
        if self.delivery.is_some() {
            return;
        }
        let held = self.requested + self.buffer.len() as u64;
        let prefetch = u64::from(self.config.prefetch.get());
        if held < prefetch {
            let n = prefetch - held;
            if self.loader.credit(n as u32).await.is_ok() {
                self.requested += n;
            }
        }
    }

    /// A message from the loader: batches (without selectors), the end of the stream, or
    /// something refused.
    fn on_loader(&mut self, m: std::result::Result<Message, ClientError>) -> Result<Flow> {
        let direct = self.delivery.is_none();
        match m {
            Ok(Message::Batch(b)) if direct && b.run_id == self.run_id => {
                if self.config.selection.score.needs_reference() {
                    return Err(TrainerError::ConfigField {
                        field: "source",
                        reason: format!("the loader sends token batches without reference losses, but `selection.score` = {:?} needs them: serve a scored cache (`rho loader --scored`) or use selectors", self.config.selection.score),
                    });
                }
                self.requested = self.requested.saturating_sub(1);
                self.admission.batch(&b)?;
                self.insert(b, None);
            }
            Ok(Message::Scored(s)) if direct && s.batch.run_id == self.run_id => {
                self.requested = self.requested.saturating_sub(1);
                // Nothing else can score the loader's batches again: a refusal stops the run.
                if let Some(reason) = self.admission.scored(&s)? {
                    return Err(TrainerError::Batch {
                        seq: s.batch.seq,
                        reason: format!("from the loader's scored cache: {reason}"),
                    });
                }
                self.insert(s.batch, Some(s.ref_loss));
            }
            Ok(Message::End(e)) => self.total = Some(e.total),
            Ok(Message::Heartbeat(_)) => {}
            Ok(Message::Shutdown(s)) if s.run_id == self.run_id => {
                return Err(TrainerError::LoaderRefused { reason: s.reason });
            }
            Ok(other) => {
                self.report.messages_rejected += 1;
                tracing::warn!("refused a `{}` message from the loader", other.kind());
            }
            Err(ClientError::Decode(e)) => {
                self.report.messages_rejected += 1;
                tracing::warn!("refused a malformed message from the loader: {e}");
            }
            Err(e) => return Err(e.into()),
        }
        Ok(Flow::Continue(()))
    }

    fn insert(&mut self, batch: TokenBatch, ref_loss: Option<Vec<f32>>) {
        let seq = batch.seq;
        if self.buffer.insert(seq, StepInput { batch, ref_loss }) == Inserted::Duplicate {
            self.report.duplicates += 1;
        }
    }

    /// Heartbeats to the loader; a loader silent for too long is connected to again and told
    /// the stream cursor. `Break` when `shutdown` came while reconnecting.
    async fn on_heartbeat<F: Future + Unpin>(&mut self, shutdown: &mut F) -> Result<Flow> {
        let _ = self.loader.heartbeat(Role::Trainer).await;
        if self.total.is_some() || self.loader.silent_for() <= self.config.liveness.timeout() {
            return Ok(Flow::Continue(()));
        }
        if !self.loader.reconnect_or(shutdown).await? {
            return Ok(self.interrupted());
        }
        self.report.reconnects += 1;
        self.requested = 0;
        // A restarted loader starts wherever its config says: tell it the cursor.
        let next_seq = self.state.next_seq;
        let _ = self
            .loader
            .resume(next_seq, self.admission.cursor_stream(), None)
            .await;
        tracing::info!(
            next_seq,
            "reconnected to the loader and sent it the stream cursor"
        );
        Ok(Flow::Continue(()))
    }

    /// A message on the delivery endpoint: a selector's heartbeat (its first one introduces it
    /// and earns its credits) or a scored batch (its credit goes back at once while the reorder
    /// buffer has room, later otherwise). A scored batch that is refused (another reference,
    /// scores that are not finite) is dropped unacknowledged, so that its lease hands it to
    /// another selector, and its selector is told to stop.
    async fn on_delivery(&mut self, incoming: Option<Incoming>) -> Result<Flow> {
        let (Some(incoming), Some(d)) = (incoming, self.delivery.as_mut()) else {
            return Ok(Flow::Break(()));
        };
        match incoming {
            Incoming::Refused { .. } => {}
            Incoming::Message {
                peer,
                message: Message::Heartbeat(_),
            } => {
                let _ = d.send(&peer, &heartbeat(&self.run_id)).await;
                if self.known.insert(peer.clone()) {
                    let n = self.config.credits_per_selector;
                    let _ = d.send(&peer, &credit(&self.run_id, n.get())).await;
                }
            }
            Incoming::Message {
                peer,
                message: Message::Scored(s),
            } => {
                if let Some(reason) = self.admission.scored(&s)? {
                    self.report.reference_refused += 1;
                    tracing::warn!(seq = s.batch.seq, selector = ?peer, "refused a scored batch and told its selector to stop: {reason}");
                    let stop = Message::Shutdown(Shutdown {
                        run_id: self.run_id.clone(),
                        reason,
                    });
                    let d = self.delivery.as_mut().expect("matched above");
                    let _ = d.send(&peer, &stop).await;
                    return Ok(Flow::Continue(()));
                }
                self.insert(s.batch, Some(s.ref_loss));
                match self.buffer.has_room() {
                    true => {
                        let d = self.delivery.as_mut().expect("matched above");
                        let _ = d.send(&peer, &credit(&self.run_id, 1)).await;
                    }
                    false => self.owed.push_back(peer),
                }
            }
            Incoming::Message { peer, message } => {
                let why = format!("a `{}` message on the delivery endpoint", message.kind());
                d.refuse(peer, &why);
            }
        }
        Ok(Flow::Continue(()))
    }

    /// The end: a last evaluation and checkpoint, and the report.
    async fn finish(mut self) -> Result<Report> {
        if self
            .report
            .evals
            .last()
            .is_none_or(|e| e.step != self.state.step)
        {
            self.evaluate()?;
        }
        self.checkpoint()?;
        self.progress.finish_and_clear();
        // The last acknowledgement is queued, not necessarily sent: give it a moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut report = self.report;
        report.messages_rejected += self.delivery.as_ref().map_or(0, Producer::refused);
        report.steps = self.state.step;
        report.next_seq = self.state.next_seq;
        report.tokens = self.state.tokens;
        report.wall_secs = self.clock.started.elapsed().as_secs_f64();
        report.data_wait_fraction = self.clock.wait_fraction();
        Ok(report)
    }
}

/// The next message on the delivery endpoint; never, without one.
async fn next_delivery(delivery: Option<&mut Producer>) -> Option<Incoming> {
    match delivery {
        Some(d) => d.recv().await,
        None => std::future::pending().await,
    }
}

fn build_backend(config: &TrainerConfig) -> Result<Box<dyn Backend>> {
    match config.backend {
        BackendChoice::Null => Ok(Box::new(NullBackend)),
        BackendChoice::Candle => {
            let dir = config
                .model
                .as_ref()
                .ok_or_else(|| TrainerError::ConfigField {
                    field: "model",
                    reason: "missing".into(),
                })?;
            let device = config.device.open()?;
            Ok(Box::new(
                CandleBackend::from_checkpoint(dir, &device, config.optimizer)?
                    .split(config.micro_batches, config.lanes)?,
            ))
        }
    }
}

/// Takes the checkpoint directory, when there is one, and the state to start from: a resumed
/// checkpoint's (loaded into `backend`, its directory returned) or step 0.
fn open_checkpoints(
    config: &TrainerConfig,
    backend: &mut dyn Backend,
) -> Result<(
    Option<Checkpoints>,
    TrainerState,
    Option<std::path::PathBuf>,
)> {
    let fresh = TrainerState {
        run_id: config.run_id.clone(),
        step: 0,
        next_seq: 0,
        tokens: 0,
        stream: Default::default(),
    };
    let Some(ck) = &config.checkpoint else {
        return Ok((None, fresh, None));
    };
    let (held, found) = Checkpoints::open(&ck.dir, config.resume, ck.overwrite)?;
    let Some((dir, saved)) = found else {
        return Ok((Some(held), fresh, None));
    };
    if saved.run_id != config.run_id {
        let why = format!("belongs to run `{}`, not `{}`", saved.run_id, config.run_id);
        return Err(TrainerError::checkpoint(dir, why));
    }
    backend.load(&dir)?;
    tracing::info!(checkpoint = %dir.display(), step = saved.step, next_seq = saved.next_seq, "resumed");
    Ok((Some(held), saved, Some(dir)))
}

/// Binds the endpoint selectors deliver to; a bad address or endpoint file is the config's.
async fn bind_delivery(
    config: &TrainerConfig,
    limits: Limits,
    key: Option<Key>,
) -> Result<Producer> {
    let p = Producer::bind(
        config.delivery.as_str(),
        config.advertise.as_deref(),
        config.delivery_file.as_deref(),
        &config.run_id,
        limits,
        key,
    )
    .await
    .map_err(|e| match e {
        ProducerError::Bind { .. } | ProducerError::Unsigned { .. } => TrainerError::ConfigField {
            field: "delivery",
            reason: rho_common::error_chain(&e),
        },
        ProducerError::EndpointFile { .. } => TrainerError::ConfigField {
            field: "delivery_file",
            reason: rho_common::error_chain(&e),
        },
        other => other.into(),
    })?;
    tracing::info!(endpoint = %p.endpoint(), "trainer delivery endpoint listening");
    Ok(p)
}

fn credit(run_id: &str, n: u32) -> Message {
    Message::Credit(Credit {
        run_id: run_id.into(),
        n,
        rank: None,
    })
}

fn heartbeat(run_id: &str) -> Message {
    Message::Heartbeat(Heartbeat {
        run_id: run_id.into(),
        role: Role::Trainer,
        at_ms: rho_protocol::now_ms(),
    })
}
