//! `rho bench fanout`: how many batches a second one loader of every rank and the routing of K
//! selectors deliver to W ranks, with nothing else in the way: the selectors score with a null
//! model (zeros) and the ranks are null consumers in this process that take each batch, check
//! that it is theirs, acknowledge it to the loader and grant the credit back. Everything else is
//! real: the loader reads, tokenizes and packs the corpus on its threads, every message crosses
//! loopback TCP and is encoded and decoded, leases, credits and acknowledgements run as in a run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use rho_protocol::client::Consumer;
use rho_protocol::{Credit, Endpoint, Fingerprint, Limits, Message, TokenBatch};
use rho_selector::Scorer;
use zeromq::{RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use super::corpus::synthetic_corpus;

/// What `rho bench fanout` measures on.
#[derive(Args)]
pub struct FanoutArgs {
    /// Working directory (corpus, tokenizer).
    #[arg(long, default_value = "runs/bench-fanout")]
    pub out: PathBuf,
    /// Rank counts to measure, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub ranks: Vec<usize>,
    /// Selectors (null model) routing the batches.
    #[arg(long, default_value_t = 2)]
    pub selectors: usize,
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Passes over the corpus (the loader tokenizes each document once per pass).
    #[arg(long, default_value_t = 3)]
    pub epochs: u32,
    /// The loader's tokenizer threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Trainer GPUs whose need the result is set against, each at `gpu_tokens_per_s`.
    #[arg(long, default_value_t = 64)]
    pub gpus: usize,
    #[arg(long, default_value_t = 24_000.0)]
    pub gpu_tokens_per_s: f64,
    /// Score with this reference model (a HuggingFace directory whose vocabulary covers the
    /// corpus's tokenizer, `rho model init --tokenizer RUN/tokenizer.json`) instead of the null
    /// model: the selectors' cost of serving several ranks against one, with real scoring.
    #[arg(long)]
    pub model: Option<PathBuf>,
}

/// A reference model that costs nothing: every loss 0.
struct NullScorer {
    fingerprint: Fingerprint,
    vocab: usize,
}

impl Scorer for NullScorer {
    fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn score(&self, batch: &TokenBatch) -> Result<Vec<f32>, rho_model::ModelError> {
        Ok(vec![0.0; batch.rows * (batch.window - 1)])
    }
}

/// What the null ranks of one measurement received.
#[derive(Default)]
struct Tally {
    batches: AtomicU64,
    /// Milliseconds since the start at the first and the last batch received.
    first_ms: AtomicU64,
    last_ms: AtomicU64,
    wrong_rank: AtomicU64,
}

/// Runs the fan-out benchmark and prints one table row per rank count.
pub async fn run(args: FanoutArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let out = args.out.canonicalize()?;
    let (data, tokenizer, vocab) = synthetic_corpus(&out, 4, 3000, 11, 8192)?;
    let tokens_per_batch = (args.seq_len * args.batch_size) as f64;
    let need = args.gpus as f64 * args.gpu_tokens_per_s / tokens_per_batch;
    println!(
        "need of {} trainer GPUs at {:.0} tokens/s each: {need:.1} batches/s of {} x {}",
        args.gpus, args.gpu_tokens_per_s, args.batch_size, args.seq_len
    );
    println!("| ranks | selectors | batches | seconds | batches/s | tokens/s | vs need |");
    println!("|---|---|---|---|---|---|---|");
    for &ranks in &args.ranks {
        let (batches, secs) = once(&args, &out, &data, &tokenizer, vocab, ranks).await?;
        let rate = batches as f64 / secs;
        println!(
            "| {ranks} | {} | {batches} | {secs:.2} | {rate:.1} | {:.0} | {:.2}x |",
            args.selectors,
            rate * tokens_per_batch,
            rate / need
        );
    }
    Ok(())
}

/// One measurement: the whole stream through `ranks` null ranks; (batches, seconds from the
/// first batch received to the last).
async fn once(
    args: &FanoutArgs,
    out: &std::path::Path,
    data: &std::path::Path,
    tokenizer: &std::path::Path,
    vocab: usize,
    ranks: usize,
) -> anyhow::Result<(u64, f64)> {
    let endpoint_file = out.join(format!("loader-{ranks}.endpoint"));
    let loader: rho_loader::LoaderConfig = serde_json::from_value(serde_json::json!({
        "run_id": "fanout",
        "data": {"paths": [data]},
        "tokenizer": tokenizer,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "world": ranks,
        "threads": args.threads,
        "max_in_flight": 4,
        "endpoint": "tcp://127.0.0.1:0",
        "endpoint_file": endpoint_file,
        "metrics_interval_secs": 60.0,
    }))?;
    let fingerprint = rho_common::tokenizer::load(tokenizer)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tokenizer.display()))?
        .fingerprint;
    let (loader_task, loader_at) = super::loader::start_in_process(loader).await?;
    let started = Instant::now();
    let tally = Arc::new(Tally::default());
    let mut trainers = Vec::new();
    let mut rank_tasks = Vec::new();
    for r in 0..ranks {
        let mut router = RouterSocket::new();
        let at = router.bind("tcp://127.0.0.1:0").await?.to_string();
        trainers.push(Endpoint::new(&at).map_err(|e| anyhow::anyhow!("{at}: {e}"))?);
        let acker = Consumer::connect(&loader_at, "fanout", Limits::default()).await?;
        rank_tasks.push(tokio::spawn(null_rank(
            router,
            acker,
            (r as u64, ranks as u64),
            tally.clone(),
            started,
        )));
    }
    let scorer: Arc<dyn Scorer> = match &args.model {
        None => Arc::new(NullScorer {
            fingerprint: Fingerprint::of_bytes(b"null reference"),
            vocab,
        }),
        Some(model) => {
            let config: rho_selector::SelectorConfig = serde_json::from_value(
                serde_json::json!({"model": model, "tokenizer": tokenizer}),
            )?;
            Arc::new(rho_selector::worker::load_scorer(&config)?.0)
        }
    };
    let mut selectors = Vec::new();
    for _ in 0..args.selectors {
        let mut config: rho_selector::SelectorConfig = serde_json::from_value(serde_json::json!({
            "run_id": "fanout",
            "loader": loader_at,
            "model": args.model.as_deref().unwrap_or(std::path::Path::new("null")),
            "tokenizer": tokenizer,
            "lanes": 1,
            "metrics_interval_secs": 60.0,
        }))?;
        match ranks {
            1 => config.trainer = trainers[0].clone(),
            _ => config.trainers = trainers.clone(),
        }
        let (scorer, fingerprint) = (scorer.clone(), fingerprint.clone());
        selectors.push(tokio::spawn(rho_selector::worker::serve(
            config,
            scorer,
            fingerprint,
            std::future::pending(),
        )));
    }
    for s in selectors {
        s.await?.context("a selector")?;
    }
    let report = loader_task.await?.context("the loader")?;
    for t in rank_tasks {
        t.abort();
    }
    let batches = tally.batches.load(Ordering::Relaxed);
    let wrong = tally.wrong_rank.load(Ordering::Relaxed);
    if wrong > 0 {
        bail!("{wrong} batches reached a rank they do not belong to");
    }
    if Some(batches) != report.total {
        bail!(
            "the ranks received {batches} batches of the loader's {:?}",
            report.total
        );
    }
    let span_ms = tally
        .last_ms
        .load(Ordering::Relaxed)
        .saturating_sub(tally.first_ms.load(Ordering::Relaxed));
    Ok((batches, (span_ms as f64 / 1e3).max(1e-3)))
}

/// A rank that trains in no time: credits for each selector that introduces itself, each batch
/// checked against its rank, acknowledged to the loader, and its credit given back.
async fn null_rank(
    mut router: RouterSocket,
    mut acker: Consumer,
    (rank, world): (u64, u64),
    tally: Arc<Tally>,
    started: Instant,
) -> anyhow::Result<()> {
    let mut known: Vec<Bytes> = Vec::new();
    loop {
        let mut frames = router.recv().await?.into_vec();
        let peer = frames.remove(0);
        let credit = |n| -> anyhow::Result<ZmqMessage> {
            let mut f = vec![peer.clone()];
            f.extend(
                Message::Credit(Credit {
                    run_id: "fanout".into(),
                    n,
                    rank: None,
                })
                .encode(),
            );
            ZmqMessage::try_from(f).map_err(|e| anyhow::anyhow!("{e}"))
        };
        match Message::decode(&frames, &Limits::default()) {
            Ok(Message::Heartbeat(_)) if !known.contains(&peer) => {
                known.push(peer.clone());
                router.send(credit(4)?).await?;
            }
            Ok(Message::Scored(s)) => {
                let now = started.elapsed().as_millis() as u64;
                if tally.batches.fetch_add(1, Ordering::Relaxed) == 0 {
                    tally.first_ms.store(now, Ordering::Relaxed);
                }
                tally.last_ms.fetch_max(now, Ordering::Relaxed);
                if s.batch.seq % world != rank {
                    tally.wrong_rank.fetch_add(1, Ordering::Relaxed);
                }
                acker.ack(vec![s.batch.seq]).await?;
                router.send(credit(1)?).await?;
            }
            _ => {}
        }
    }
}
