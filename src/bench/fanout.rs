//! `rho bench fanout`: how many batches a second one loader of every rank and the routing of K
//! selectors deliver to W ranks, with nothing else in the way: the selectors score with a null
//! model (zeros) and the ranks are null consumers in this process that take each batch, check
//! that it is theirs, acknowledge it to the loader and grant the credit back. Everything else is
//! real: the loader reads, tokenizes and packs the corpus on its threads, every message crosses
//! loopback TCP and is encoded and decoded, leases, credits and acknowledgements run as in a run.
//! With `--cache`, the same stream is first scored once into a scored cache, and then the loader
//! serves that cache to the W ranks directly: no tokenizing and no selectors on the way.

use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use rho_protocol::client::Consumer;
use rho_protocol::{Credit, Fingerprint, Limits, Message, Rank, TokenBatch};
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
    /// Serve the ranks from a scored cache: one pass through the selectors first writes the
    /// stream to `OUT/cache`, then each measurement is the loader serving that cache (`rho
    /// loader --scored`) to the ranks, which take their batches from it directly.
    #[arg(long)]
    pub cache: bool,
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
    let corpus = Corpus {
        out,
        data,
        tokenizer,
        vocab,
    };
    let tokens_per_batch = (args.seq_len * args.batch_size) as f64;
    let need = args.gpus as f64 * args.gpu_tokens_per_s / tokens_per_batch;
    println!(
        "need of {} trainer GPUs at {:.0} tokens/s each: {need:.1} batches/s of {} x {}",
        args.gpus, args.gpu_tokens_per_s, args.batch_size, args.seq_len
    );
    let cache = match args.cache {
        false => None,
        true => Some(write_cache(&args, &corpus).await?),
    };
    println!("| ranks | selectors | batches | seconds | batches/s | tokens/s | vs need |");
    println!("|---|---|---|---|---|---|---|");
    for &ranks in &args.ranks {
        let (batches, secs) = match &cache {
            None => through_selectors(&args, &corpus, ranks, None).await?,
            Some(dir) => from_cache(&args, &corpus, dir, ranks).await?,
        };
        let rate = batches as f64 / secs;
        println!(
            "| {ranks} | {} | {batches} | {secs:.2} | {rate:.1} | {:.0} | {:.2}x |",
            match cache {
                None => args.selectors.to_string(),
                Some(_) => "none (cache)".into(),
            },
            rate * tokens_per_batch,
            rate / need
        );
    }
    Ok(())
}

/// The benchmark's corpus: its working directory, shards, tokenizer and vocabulary size.
struct Corpus {
    out: PathBuf,
    data: PathBuf,
    tokenizer: PathBuf,
    vocab: usize,
}

/// Scores the whole stream once through the selectors into `OUT/cache` (emptied first); returns
/// the cache's directory.
async fn write_cache(args: &FanoutArgs, corpus: &Corpus) -> anyhow::Result<PathBuf> {
    let dir = corpus.out.join("cache");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    let started = Instant::now();
    let (batches, _) = through_selectors(args, corpus, 1, Some(&dir)).await?;
    println!(
        "scored cache {}: {batches} batches written in {:.2} s",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(dir)
}

/// The loader of this measurement: the corpus's stream split among `ranks` ranks, on loopback.
fn loader_config(
    args: &FanoutArgs,
    corpus: &Corpus,
    ranks: usize,
) -> anyhow::Result<rho_loader::LoaderConfig> {
    let mut loader = crate::runtime::loader_config(
        vec![corpus.data.to_string_lossy().into_owned()],
        &corpus.tokenizer,
        args.seq_len,
        args.batch_size,
    )?;
    loader.run_id = RUN_ID.into();
    loader.epochs = NonZeroU32::new(args.epochs).context("--epochs is 0")?;
    loader.world = NonZeroU32::new(u32::try_from(ranks)?).context("a rank count is 0")?;
    loader.threads = args.threads;
    loader.max_in_flight = NonZeroUsize::MIN.saturating_add(3);
    loader.endpoint = crate::runtime::endpoint("tcp://127.0.0.1:0")?;
    loader.endpoint_file = Some(corpus.out.join(format!("loader-{ranks}.endpoint")));
    loader.metrics_interval_secs = 60.0;
    Ok(loader)
}

/// One measurement through the selectors: the whole stream through `ranks` null ranks, the
/// selectors writing what they score to `cache_out` when given; (batches, seconds from the first
/// batch received to the last).
async fn through_selectors(
    args: &FanoutArgs,
    corpus: &Corpus,
    ranks: usize,
    cache_out: Option<&std::path::Path>,
) -> anyhow::Result<(u64, f64)> {
    let (loader_task, loader_at) =
        super::loader::start_in_process(loader_config(args, corpus, ranks)?).await?;
    let started = Instant::now();
    let tally = Arc::new(Tally::default());
    let mut trainers = Vec::new();
    let mut rank_tasks = Vec::new();
    for r in 0..ranks {
        let mut router = RouterSocket::new();
        let at = router.bind("tcp://127.0.0.1:0").await?.to_string();
        trainers.push(crate::runtime::endpoint(&at)?);
        let acker = Consumer::connect(&loader_at, RUN_ID, Limits::default()).await?;
        rank_tasks.push(tokio::spawn(null_rank(
            router,
            acker,
            (r as u64, ranks as u64),
            tally.clone(),
            started,
        )));
    }
    let (scorer, fingerprint) = scorer(args, corpus)?;
    let mut selectors = Vec::new();
    for _ in 0..args.selectors {
        let model = args.model.clone().unwrap_or_else(|| "null".into());
        let mut config = rho_selector::SelectorConfig::new(model, corpus.tokenizer.clone());
        config.run_id = RUN_ID.into();
        config.loader = crate::runtime::endpoint(&loader_at)?;
        config.lanes = Some(NonZeroUsize::MIN);
        config.metrics_interval_secs = 60.0;
        config.cache_out = cache_out.map(|d| d.to_path_buf());
        match ranks {
            1 => config.trainer = trainers[0].clone(),
            _ => config.trainers = trainers.clone(),
        }
        selectors.push(tokio::spawn(rho_selector::worker::serve(
            config,
            scorer.clone(),
            fingerprint.clone(),
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
    tally.measured(&report)
}

/// The selectors' reference model (the null one unless `--model`) and the tokenizer's
/// fingerprint they check batches against.
fn scorer(args: &FanoutArgs, corpus: &Corpus) -> anyhow::Result<(Arc<dyn Scorer>, Fingerprint)> {
    let tokenizer = &corpus.tokenizer;
    let fingerprint = rho_common::tokenizer::load(tokenizer)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tokenizer.display()))?
        .fingerprint;
    let scorer: Arc<dyn Scorer> = match &args.model {
        None => Arc::new(NullScorer {
            fingerprint: Fingerprint::of_bytes(b"null reference"),
            vocab: corpus.vocab,
        }),
        Some(model) => {
            let config = rho_selector::SelectorConfig::new(model.clone(), tokenizer.clone());
            Arc::new(rho_selector::worker::load_scorer(&config)?.0)
        }
    };
    Ok((scorer, fingerprint))
}

/// One measurement from the scored cache `dir`: the loader serves it to `ranks` null ranks that
/// take their batches from it directly; (batches, seconds from the first batch received to the
/// last).
async fn from_cache(
    args: &FanoutArgs,
    corpus: &Corpus,
    dir: &std::path::Path,
    ranks: usize,
) -> anyhow::Result<(u64, f64)> {
    let mut config = loader_config(args, corpus, ranks)?;
    config.scored = Some(dir.to_path_buf());
    let (loader_task, loader_at) = super::loader::start_in_process(config).await?;
    let started = Instant::now();
    let tally = Arc::new(Tally::default());
    let world = u32::try_from(ranks)?;
    let mut rank_tasks = Vec::new();
    for rank in 0..world {
        let consumer = Consumer::connect(&loader_at, RUN_ID, Limits::default()).await?;
        let rank = Rank::new(rank, world).context("a rank beyond its world")?;
        rank_tasks.push(tokio::spawn(cache_rank(
            consumer,
            rank,
            tally.clone(),
            started,
        )));
    }
    for t in rank_tasks {
        t.await?.context("a rank")?;
    }
    let report = loader_task.await?.context("the loader")?;
    tally.measured(&report)
}

/// The run id of every process of the benchmark.
const RUN_ID: &str = "fanout";

impl Tally {
    /// One batch received now by `rank` of `world`, whose sequence number is `seq`.
    fn record(&self, seq: u64, (rank, world): (u64, u64), started: Instant) {
        let now = started.elapsed().as_millis() as u64;
        if self.batches.fetch_add(1, Ordering::Relaxed) == 0 {
            self.first_ms.store(now, Ordering::Relaxed);
        }
        self.last_ms.fetch_max(now, Ordering::Relaxed);
        if seq % world != rank {
            self.wrong_rank.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (batches, seconds from the first batch received to the last), once the ranks received
    /// exactly the loader's stream, each batch at its own rank.
    fn measured(&self, report: &rho_loader::Report) -> anyhow::Result<(u64, f64)> {
        let batches = self.batches.load(Ordering::Relaxed);
        let wrong = self.wrong_rank.load(Ordering::Relaxed);
        if wrong > 0 {
            bail!("{wrong} batches reached a rank they do not belong to");
        }
        if Some(batches) != report.total {
            bail!(
                "the ranks received {batches} batches of the loader's {:?}",
                report.total
            );
        }
        let span_ms = self
            .last_ms
            .load(Ordering::Relaxed)
            .saturating_sub(self.first_ms.load(Ordering::Relaxed));
        Ok((batches, (span_ms as f64 / 1e3).max(1e-3)))
    }
}

/// A rank that trains from the cache in no time: its credits to the loader, each batch checked
/// against its rank, acknowledged, and its credit given back, until the end of the stream.
async fn cache_rank(
    mut loader: Consumer,
    rank: Rank,
    tally: Arc<Tally>,
    started: Instant,
) -> anyhow::Result<()> {
    loader.credit_for(4, Some(rank)).await?;
    loop {
        match loader.recv().await? {
            Message::Scored(s) => {
                let seq = s.batch.seq;
                tally.record(seq, (rank.rank.into(), rank.world.into()), started);
                loader.ack(vec![seq]).await?;
                loader.credit_for(1, Some(rank)).await?;
            }
            Message::End(_) => return Ok(()),
            Message::Heartbeat(_) => {}
            other => bail!("{rank}: unexpected `{}` from the loader", other.kind()),
        }
    }
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
                    run_id: RUN_ID.into(),
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
                tally.record(s.batch.seq, (rank, world), started);
                acker.ack(vec![s.batch.seq]).await?;
                router.send(credit(1)?).await?;
            }
            _ => {}
        }
    }
}
