//! The selector process: token batches in (by credit, from the loader), scored batches out (by
//! credit, to the trainer).
//!
//! Backpressure runs end to end: the selector asks the loader only for as many batches as the
//! trainer has granted it credits for (and at most `prefetch`), so no process buffers more than
//! its consumer can take.

use std::collections::VecDeque;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rho_protocol::client::{ClientError, Consumer};
use rho_protocol::{Fingerprint, Limits, Message, Role, ScoredBatch, TokenBatch};

use crate::config::SelectorConfig;
use crate::scorer::{CandleScorer, Scorer};
use crate::{Result, SelectorError};

/// What a selector did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub batches: u64,
    /// Valid target positions scored.
    pub tokens: u64,
    pub wall_secs: f64,
    /// Time spent in the model.
    pub score_secs: f64,
    /// Time batches waited between arrival and scoring, summed.
    pub queue_wait_secs: f64,
    /// Time from a batch's arrival to its delivery, summed.
    pub latency_secs: f64,
    pub messages_rejected: u64,
    /// Connections dropped and made again because a peer fell silent.
    pub reconnects: u64,
    /// Bytes written to the scored cache (`cache_out`).
    pub cache_bytes: u64,
    pub interrupted: bool,
}

impl Report {
    fn line(&self, elapsed: f64) -> serde_json::Value {
        let n = self.batches.max(1) as f64;
        serde_json::json!({
            "elapsed_s": elapsed,
            "batches": self.batches,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens as f64 / elapsed.max(1e-9),
            "mean_score_ms": self.score_secs / n * 1e3,
            "mean_latency_ms": self.latency_secs / n * 1e3,
            "mean_queue_wait_ms": self.queue_wait_secs / n * 1e3,
            "idle_fraction": 1.0 - self.score_secs / elapsed.max(1e-9),
            "messages_rejected": self.messages_rejected,
        })
    }
}

/// The tokenizer's fingerprint and vocabulary size.
pub fn tokenizer_identity(path: &Path) -> Result<(Fingerprint, usize)> {
    let err = |reason: String| SelectorError::Tokenizer {
        path: path.to_path_buf(),
        reason,
    };
    let t = rho_protocol::tokenizer::load(path).map_err(err)?;
    Ok((t.fingerprint, t.tokenizer.get_vocab_size(true)))
}

/// Loads the reference model of a config and checks it against the tokenizer.
pub fn load_scorer(config: &SelectorConfig) -> Result<(CandleScorer, Fingerprint)> {
    let model_err = |source| SelectorError::Model {
        path: config.model.clone(),
        source,
    };
    let (tokenizer, tokenizer_vocab) = tokenizer_identity(&config.tokenizer)?;
    let device = rho_model::parse_device(&config.device).map_err(model_err)?;
    let dtype = rho_model::parse_dtype(&config.dtype, &device).map_err(model_err)?;
    let scorer =
        CandleScorer::load(&config.model, &device, dtype, config.loss_chunk).map_err(model_err)?;
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
    let (scorer, tokenizer) = tokio::task::spawn_blocking(move || load_scorer(&cfg))
        .await
        .map_err(|e| SelectorError::Transport(e.to_string()))??;
    let scorer: Arc<dyn Scorer> = Arc::new(scorer);
    tracing::info!(model = %config.model.display(), fingerprint = %scorer.fingerprint(), "reference model loaded");
    serve(config, scorer, tokenizer, shutdown).await
}

/// Counts and logs a message the selector does not take.
fn refuse(
    report: &mut Report,
    from: &str,
    m: std::result::Result<Message, ClientError>,
) -> Result<()> {
    match m {
        Ok(other) => {
            report.messages_rejected += 1;
            tracing::warn!("refused a `{}` message from the {from}", other.kind());
            Ok(())
        }
        Err(ClientError::Decode(e)) => {
            report.messages_rejected += 1;
            tracing::warn!("refused a malformed message from the {from}: {e}");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The selector loop around any [`Scorer`].
pub async fn serve(
    config: SelectorConfig,
    scorer: Arc<dyn Scorer>,
    tokenizer: Fingerprint,
    shutdown: impl Future<Output = ()>,
) -> Result<Report> {
    let started = Instant::now();
    let limits = Limits::with_max_message_bytes(config.max_message_bytes);
    let key = rho_protocol::Key::from_config(config.secret_file.as_deref()).map_err(|reason| {
        SelectorError::ConfigField {
            field: "secret_file",
            reason,
        }
    })?;
    let mut trainer =
        Consumer::connect_with(&config.trainer, &config.run_id, limits, key.clone()).await?;
    let _ = trainer.heartbeat(Role::Selector).await;
    let mut loader = Consumer::connect_with(&config.loader, &config.run_id, limits, key).await?;
    tracing::info!(loader = %config.loader, trainer = %config.trainer, "selector connected");

    let mut report = Report::default();
    let mut metrics = match &config.metrics {
        Some(p) => {
            Some(rho_protocol::jsonl::JsonLines::open(p, false).map_err(SelectorError::Transport)?)
        }
        None => None,
    };
    let progress = indicatif::ProgressBar::new_spinner();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(config.metrics_interval_secs));
    let mut beat = tokio::time::interval(config.liveness.every());
    // `down`: batches the trainer has room for; `requested`: asked of the loader, not yet here.
    let (mut down, mut requested) = (0u64, 0u64);
    let mut queue: VecDeque<(TokenBatch, Instant)> = VecDeque::new();
    let mut scoring: Option<tokio::task::JoinHandle<Scored>> = None;
    // Scored batches waiting for a credit from the trainer (or for it to come back).
    let mut outbox: VecDeque<(Message, Instant)> = VecDeque::new();
    let mut ended = false;
    let mut cache = match &config.cache_out {
        Some(dir) => {
            let w = rho_protocol::cache::CacheWriter::create(
                dir,
                rho_protocol::cache::CacheHeader {
                    version: 1,
                    run_id: config.run_id.clone(),
                    tokenizer: tokenizer.clone(),
                    ref_model: scorer.fingerprint().clone(),
                },
            )
            .map_err(|e| SelectorError::Transport(format!("cache: {e}")))?;
            tracing::info!(file = %w.path().display(), "writing scored batches to the cache");
            Some(w)
        }
        None => None,
    };
    tokio::pin!(shutdown);

    loop {
        while down > 0 {
            let Some((scored, arrived)) = outbox.pop_front() else {
                break;
            };
            if trainer.send(&scored).await.is_err() {
                // The trainer is gone; the batch waits for the reconnection.
                outbox.push_front((scored, arrived));
                break;
            }
            down -= 1;
            report.batches += 1;
            report.latency_secs += arrived.elapsed().as_secs_f64();
        }
        let held =
            requested + queue.len() as u64 + u64::from(scoring.is_some()) + outbox.len() as u64;
        let want = down.min(u64::from(config.prefetch));
        if !ended && held < want {
            let n = (want - held) as u32;
            if loader.credit(n).await.is_ok() {
                requested += u64::from(n);
            }
        }
        if scoring.is_none() {
            if let Some((batch, arrived)) = queue.pop_front() {
                if batch.tokenizer != tokenizer {
                    return Err(SelectorError::TokenizerMismatch {
                        seq: batch.seq,
                        got: batch.tokenizer.to_string(),
                        expected: tokenizer.to_string(),
                        path: config.tokenizer.clone(),
                    });
                }
                let s = scorer.clone();
                scoring = Some(tokio::task::spawn_blocking(move || {
                    let begin = Instant::now();
                    let result = s.score(&batch);
                    Scored {
                        batch,
                        arrived,
                        started: begin,
                        result,
                        secs: begin.elapsed().as_secs_f64(),
                    }
                }));
            } else if ended && outbox.is_empty() {
                break;
            }
        }
        tokio::select! {
            _ = &mut shutdown => {
                report.interrupted = true;
                break;
            }
            m = loader.recv() => match m {
                Ok(Message::Batch(b)) if b.run_id == config.run_id => {
                    requested = requested.saturating_sub(1);
                    queue.push_back((b, Instant::now()));
                }
                Ok(Message::End(_)) => ended = true,
                Ok(Message::Heartbeat(_)) => {}
                other => refuse(&mut report, "loader", other)?,
            },
            m = trainer.recv() => match m {
                Ok(Message::Credit(c)) if c.run_id == config.run_id => down += u64::from(c.n),
                Ok(Message::Shutdown(s)) => {
                    tracing::info!(reason = %s.reason, "the trainer asked this selector to stop");
                    report.interrupted = true;
                    break;
                }
                Ok(Message::Heartbeat(_)) => {}
                other => refuse(&mut report, "trainer", other)?,
            },
            done = async { scoring.as_mut().expect("guarded by is_some").await }, if scoring.is_some() => {
                scoring = None;
                let done = done.map_err(|e| SelectorError::Transport(format!("scoring task: {e}")))?;
                let seq = done.batch.seq;
                let ref_loss = done.result.map_err(|source| SelectorError::Scoring { seq, source })?;
                report.tokens += done.batch.target_count() as u64;
                report.score_secs += done.secs;
                report.queue_wait_secs += done.started.duration_since(done.arrived).as_secs_f64();
                let scored = ScoredBatch {
                    batch: done.batch,
                    ref_model: scorer.fingerprint().clone(),
                    ref_loss,
                };
                let scored = Message::Scored(scored);
                if let Some(w) = cache.as_mut() {
                    tokio::task::block_in_place(|| w.append(&scored))
                        .map_err(|e| SelectorError::Transport(format!("cache: {e}")))?;
                    report.cache_bytes = w.bytes;
                }
                outbox.push_back((scored, done.arrived));
            }
            _ = beat.tick() => {
                let _ = loader.heartbeat(Role::Selector).await;
                let _ = trainer.heartbeat(Role::Selector).await;
                let timeout = config.liveness.timeout();
                if !ended && loader.silent_for() > timeout {
                    if !loader.reconnect_or(&mut shutdown).await? {
                        report.interrupted = true;
                        break;
                    }
                    report.reconnects += 1;
                    // Credits given to the old connection are gone with it.
                    requested = 0;
                    tracing::info!("reconnected to the loader");
                }
                if trainer.silent_for() > timeout {
                    if !trainer.reconnect_or(&mut shutdown).await? {
                        report.interrupted = true;
                        break;
                    }
                    report.reconnects += 1;
                    down = 0;
                    let _ = trainer.heartbeat(Role::Selector).await;
                    tracing::info!("reconnected to the trainer");
                }
            }
            _ = tick.tick() => {
                let line = report.line(started.elapsed().as_secs_f64());
                if let Some(f) = &mut metrics {
                    f.append(&line);
                }
                progress.set_message(format!(
                    "selector: {} batches, {:.0} tokens/s, queue {}, credits {}",
                    report.batches, line["tokens_per_s"].as_f64().unwrap_or(0.0), queue.len(), down
                ));
                progress.tick();
            }
        }
    }
    report.wall_secs = started.elapsed().as_secs_f64();
    if let Some(f) = &mut metrics {
        f.append(&report.line(report.wall_secs));
    }
    progress.finish_and_clear();
    Ok(report)
}
