//! The trainer process: batches in sequence order (from selectors, or from the loader directly
//! when the score rule needs no reference), one optimizer step per batch, acknowledgements to the
//! loader, evaluation, checkpoints and per-step metrics.

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rho_protocol::client::{ClientError, Consumer};
use rho_protocol::flow::{Inserted, Reorder};
use rho_protocol::producer::{Incoming, Producer, ProducerError};
use rho_protocol::{Credit, Heartbeat, Limits, Message, Role, TokenBatch};
use serde::Serialize;

use crate::backend::{Backend, NullBackend, StepInput};
use crate::candle_backend::CandleBackend;
use crate::checkpoint::{self, TrainerState};
use crate::config::{BackendChoice, TrainerConfig};
use crate::{Result, TrainerError};

/// One evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalPoint {
    pub step: u64,
    pub tokens: u64,
    pub loss: f32,
}

/// What a trainer did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub steps: u64,
    /// The stream cursor at the end.
    pub next_seq: u64,
    /// Valid target tokens trained on (all steps of this run, resumed ones included).
    pub tokens: u64,
    /// Sequence numbers trained on by this process, in order.
    pub consumed: Vec<u64>,
    pub evals: Vec<EvalPoint>,
    /// Batches received again after they were trained on or buffered (dropped).
    pub duplicates: u64,
    pub messages_rejected: u64,
    /// Times the loader fell silent and was connected to again.
    pub reconnects: u64,
    pub wall_secs: f64,
    /// Fraction of wall time spent waiting for the next batch.
    pub data_wait_fraction: f64,
    pub last_checkpoint: Option<std::path::PathBuf>,
    pub interrupted: bool,
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
            let device = rho_model::parse_device(&config.device)?;
            Ok(Box::new(CandleBackend::from_checkpoint(
                dir,
                &device,
                config.optimizer,
                config.micro_batches,
            )?))
        }
    }
}

fn credit(run_id: &str, n: u32) -> Message {
    Message::Credit(Credit {
        run_id: run_id.into(),
        n,
    })
}

fn heartbeat(run_id: &str) -> Message {
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Message::Heartbeat(Heartbeat {
        run_id: run_id.into(),
        role: Role::Trainer,
        at_ms,
    })
}

/// Runs a trainer until the stream ends (or `max_steps`), or `shutdown` resolves; checkpoints
/// at the end either way when checkpoints are configured.
pub async fn run(
    config: TrainerConfig,
    eval_batches: Vec<TokenBatch>,
    shutdown: impl Future<Output = ()>,
) -> Result<Report> {
    config.validate()?;
    let started = Instant::now();
    let cfg = config.clone();
    let mut backend = tokio::task::spawn_blocking(move || build_backend(&cfg))
        .await
        .map_err(|e| TrainerError::Transport(e.to_string()))??;
    let mut state = TrainerState {
        run_id: config.run_id.clone(),
        step: 0,
        next_seq: 0,
        tokens: 0,
    };
    let mut checkpoints = None;
    if let Some(ck) = &config.checkpoint {
        let (held, found) = checkpoint::Checkpoints::open(&ck.dir, config.resume, ck.overwrite)?;
        checkpoints = Some(held);
        if let Some((dir, saved)) = found {
            if saved.run_id != config.run_id {
                return Err(TrainerError::Checkpoint(format!(
                    "{} belongs to run `{}`, not `{}`",
                    dir.display(),
                    saved.run_id,
                    config.run_id
                )));
            }
            backend.load(&dir)?;
            tracing::info!(checkpoint = %dir.display(), step = saved.step, next_seq = saved.next_seq, "resumed");
            state = saved;
        }
    }
    let limits = Limits::with_max_message_bytes(config.max_message_bytes);
    let key = rho_protocol::Key::from_config(config.secret_file.as_deref()).map_err(|reason| {
        TrainerError::ConfigField {
            field: "secret_file",
            reason,
        }
    })?;
    let selectors = config.uses_selectors();
    let mut delivery = if selectors {
        let p = Producer::bind(
            &config.delivery,
            config.delivery_file.as_deref(),
            &config.run_id,
            limits,
            key.clone(),
        )
        .await
        .map_err(|e| match e {
            ProducerError::Bind { .. } => TrainerError::ConfigField {
                field: "delivery",
                reason: e.to_string(),
            },
            ProducerError::EndpointFile { .. } => TrainerError::ConfigField {
                field: "delivery_file",
                reason: e.to_string(),
            },
            other => TrainerError::Transport(other.to_string()),
        })?;
        tracing::info!(endpoint = %p.endpoint(), "trainer delivery endpoint listening");
        Some(p)
    } else {
        None
    };
    // The delivery endpoint is bound (or refused) first: connecting waits for the loader.
    tracing::info!(loader = %config.loader, "connecting to the loader");
    let mut loader =
        Consumer::connect_with(&config.loader, &config.run_id, limits, key.clone()).await?;
    if state.next_seq > 0 {
        loader.resume(state.next_seq).await?;
    }

    // A resumed run continues its metrics file; a fresh one starts it empty.
    let resumed = state.step > 0;
    let mut metrics =
        match &config.metrics {
            Some(p) => Some(rho_protocol::jsonl::JsonLines::open(p, resumed).map_err(
                |reason| TrainerError::ConfigField {
                    field: "metrics",
                    reason,
                },
            )?),
            None => None,
        };
    let progress = indicatif::ProgressBar::new_spinner();
    let mut report = Report::default();
    // Batches by sequence number, handed to training in order from the stream cursor.
    let mut buffer: Reorder<StepInput> = Reorder::new(state.next_seq, config.reorder_window);
    // Selectors whose credit waits for room in the reorder buffer.
    let mut owed: std::collections::VecDeque<Bytes> = std::collections::VecDeque::new();
    // Selectors that introduced themselves (each got its first credits).
    let mut known: std::collections::HashSet<Bytes> = std::collections::HashSet::new();
    let mut beat = tokio::time::interval(config.liveness.every());
    let mut requested = 0u64;
    let mut total: Option<u64> = None;
    let mut waited = Duration::ZERO;
    let mut last_step_end = Instant::now();
    let first_step = state.step;
    let eval_every = config.eval.as_ref().map(|e| e.every);
    let checkpoint_every = config.checkpoint.as_ref().and_then(|c| c.every);
    tokio::pin!(shutdown);

    if !eval_batches.is_empty() && state.step == 0 {
        let loss = tokio::task::block_in_place(|| backend.eval(&eval_batches))?;
        report.evals.push(EvalPoint {
            step: 0,
            tokens: 0,
            loss,
        });
    }

    'outer: loop {
        // Train on every batch that is next in sequence.
        while let Some(input) = buffer.pop() {
            waited += last_step_end.elapsed();
            let t0 = Instant::now();
            let stats = tokio::task::block_in_place(|| {
                backend.step(state.step, &input, &config.selection)
            })?;
            let step_secs = t0.elapsed().as_secs_f64();
            if let Err(e) = loader.ack(vec![input.batch.seq]).await {
                // The loader is away; its lease will hand the batch out again, and a duplicate
                // is dropped here.
                tracing::warn!(seq = input.batch.seq, "could not acknowledge: {e}");
            }
            if let (Some(d), Some(peer)) = (delivery.as_mut(), owed.pop_front()) {
                let _ = d.send(&peer, &credit(&config.run_id, 1)).await;
            }
            report.consumed.push(input.batch.seq);
            state.step += 1;
            // The cursor is the reorder buffer's: it moved past the batch just popped.
            state.next_seq = buffer.next();
            state.tokens += stats.tokens;
            let mut eval_loss = None;
            if eval_every.is_some_and(|e| state.step.is_multiple_of(e)) && !eval_batches.is_empty()
            {
                let loss = tokio::task::block_in_place(|| backend.eval(&eval_batches))?;
                report.evals.push(EvalPoint {
                    step: state.step,
                    tokens: state.tokens,
                    loss,
                });
                eval_loss = Some(loss);
            }
            if let (Some(ck), Some(every)) = (checkpoints.as_mut(), checkpoint_every) {
                if state.step.is_multiple_of(every) {
                    report.last_checkpoint = Some(tokio::task::block_in_place(|| {
                        ck.save(backend.as_ref(), &state)
                    })?);
                }
            }
            let elapsed = started.elapsed().as_secs_f64();
            let line = serde_json::json!({
                "step": state.step, "seq": input.batch.seq, "elapsed_s": elapsed,
                "loss_selected": stats.loss_selected, "loss_all": stats.loss_all,
                "selected_fraction": stats.selected_fraction, "mean_excess": stats.mean_excess,
                "lr": stats.lr, "grad_norm": stats.grad_norm, "tokens": stats.tokens,
                "tokens_per_s": stats.tokens as f64 / step_secs.max(1e-9),
                "data_wait_fraction": waited.as_secs_f64() / elapsed.max(1e-9),
                "eval_loss": eval_loss, "duplicates": report.duplicates,
            });
            if let Some(f) = &mut metrics {
                f.append(&line);
            }
            progress.set_message(format!(
                "trainer: step {} | loss sel {:.3} all {:.3} | selected {:.0}% | lr {:.2e} | {:.0} tok/s | waiting {:.0}%",
                state.step, stats.loss_selected, stats.loss_all, stats.selected_fraction * 100.0, stats.lr,
                line["tokens_per_s"].as_f64().unwrap_or(0.0), line["data_wait_fraction"].as_f64().unwrap_or(0.0) * 100.0
            ));
            progress.tick();
            last_step_end = Instant::now();
            if config
                .max_steps
                .is_some_and(|m| state.step - first_step >= m)
            {
                break 'outer;
            }
        }
        if total.is_some_and(|t| state.next_seq >= t) {
            break;
        }
        if !selectors {
            let held = requested + buffer.len() as u64;
            if held < u64::from(config.prefetch) {
                let n = u64::from(config.prefetch) - held;
                if loader.credit(n as u32).await.is_ok() {
                    requested += n;
                }
            }
        }
        tokio::select! {
            _ = &mut shutdown => {
                report.interrupted = true;
                break;
            }
            m = loader.recv() => match m {
                Ok(m @ (Message::Batch(_) | Message::Scored(_))) if !selectors && m.run_id() == config.run_id => {
                    let (b, ref_loss) = match m {
                        Message::Scored(s) => (s.batch, Some(s.ref_loss)),
                        Message::Batch(b) => (b, None),
                        _ => unreachable!("matched above"),
                    };
                    if ref_loss.is_none() && config.selection.score.needs_reference() {
                        return Err(TrainerError::ConfigField {
                            field: "source",
                            reason: format!("the loader sends token batches without reference losses, but `selection.score` = {:?} needs them: serve a scored cache (`rho loader --scored`) or use selectors", config.selection.score),
                        });
                    }
                    requested = requested.saturating_sub(1);
                    let seq = b.seq;
                    if buffer.insert(seq, StepInput { batch: b, ref_loss }) == Inserted::Duplicate {
                        report.duplicates += 1;
                    }
                }
                Ok(Message::End(e)) => total = Some(e.total),
                Ok(Message::Heartbeat(_)) => {}
                Ok(other) => {
                    report.messages_rejected += 1;
                    tracing::warn!("refused a `{}` message from the loader", other.kind());
                }
                Err(ClientError::Decode(e)) => {
                    report.messages_rejected += 1;
                    tracing::warn!("refused a malformed message from the loader: {e}");
                }
                Err(e) => return Err(e.into()),
            },
            _ = beat.tick() => {
                let _ = loader.heartbeat(Role::Trainer).await;
                if total.is_none() && loader.silent_for() > config.liveness.timeout() {
                    if !loader.reconnect_or(&mut shutdown).await? {
                        report.interrupted = true;
                        break;
                    }
                    report.reconnects += 1;
                    requested = 0;
                    // A restarted loader starts wherever its config says: tell it the cursor.
                    let _ = loader.resume(state.next_seq).await;
                    tracing::info!(next_seq = state.next_seq, "reconnected to the loader and sent it the stream cursor");
                }
            }
            m = async { delivery.as_mut().expect("guarded").recv().await }, if delivery.is_some() => {
                let (Some(incoming), Some(d)) = (m, delivery.as_mut()) else { break };
                match incoming {
                    Incoming::Refused { .. } => {}
                    Incoming::Message { peer, message: Message::Heartbeat(_) } => {
                        let _ = d.send(&peer, &heartbeat(&config.run_id)).await;
                        // A selector's first heartbeat introduces it: it gets its credits.
                        if known.insert(peer.clone()) {
                            let _ = d.send(&peer, &credit(&config.run_id, config.credits_per_selector)).await;
                        }
                    }
                    Incoming::Message { peer, message: Message::Scored(s) } => {
                        let seq = s.batch.seq;
                        if buffer.insert(seq, StepInput { batch: s.batch, ref_loss: Some(s.ref_loss) }) == Inserted::Duplicate {
                            report.duplicates += 1;
                        }
                        // The credit goes back at once while the buffer has room.
                        if buffer.has_room() {
                            let _ = d.send(&peer, &credit(&config.run_id, 1)).await;
                        } else {
                            owed.push_back(peer);
                        }
                    }
                    Incoming::Message { peer, message } => {
                        d.refuse(peer, &format!("a `{}` message on the delivery endpoint", message.kind()));
                    }
                }
            }
        }
    }
    // The end: a last evaluation and checkpoint.
    if !eval_batches.is_empty() && report.evals.last().is_none_or(|e| e.step != state.step) {
        let loss = tokio::task::block_in_place(|| backend.eval(&eval_batches))?;
        report.evals.push(EvalPoint {
            step: state.step,
            tokens: state.tokens,
            loss,
        });
    }
    if let Some(ck) = checkpoints.as_mut() {
        report.last_checkpoint = Some(tokio::task::block_in_place(|| {
            ck.save(backend.as_ref(), &state)
        })?);
    }
    progress.finish_and_clear();
    // The last acknowledgement is queued, not necessarily sent: give it a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    report.messages_rejected += delivery.as_ref().map_or(0, Producer::refused);
    report.steps = state.step;
    report.next_seq = state.next_seq;
    report.tokens = state.tokens;
    report.wall_secs = started.elapsed().as_secs_f64();
    report.data_wait_fraction = waited.as_secs_f64() / report.wall_secs.max(1e-9);
    Ok(report)
}
