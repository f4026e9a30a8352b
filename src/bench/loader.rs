//! `rho bench loader`: documents and tokens per second of the loader, per thread count.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use rho_loader::sources::{self, Event};
use rho_protocol::client::Consumer;
use rho_protocol::{Limits, Message};

use crate::synth::{self as corpus, SynthArgs};

/// What `rho bench loader` measures on.
#[derive(Args)]
pub struct LoaderArgs {
    /// Working directory (corpus, tokenizer).
    #[arg(long, default_value = "runs/bench-loader")]
    pub out: PathBuf,
    /// Shards to read instead of a generated corpus.
    #[arg(long)]
    pub input: Option<String>,
    /// Tokenizer to use instead of training one on the corpus.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    pub shards: usize,
    #[arg(long, default_value_t = 3000)]
    pub docs_per_shard: usize,
    /// Loader thread counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub threads: Vec<usize>,
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

/// Runs the loader benchmark.
pub async fn run(args: LoaderArgs) -> anyhow::Result<()> {
    let LoaderArgs {
        out,
        input,
        tokenizer,
        shards,
        docs_per_shard,
        threads,
        seq_len,
        batch_size,
    } = args;
    std::fs::create_dir_all(&out)?;
    let out = out.canonicalize()?;
    let input = match input {
        Some(i) => i,
        None => {
            let dir = out.join("data");
            if !dir.exists() {
                corpus::write_corpus(&SynthArgs {
                    out: dir.clone(),
                    shards,
                    docs_per_shard,
                    noise: 0.4,
                    easy: 0.0,
                    seed: 7,
                })?;
            }
            dir.to_string_lossy().into_owned()
        }
    };
    let data = rho_loader::DataConfig {
        paths: vec![input.clone()],
        text_field: "text".into(),
        format: rho_loader::FormatChoice::Auto,
    };
    let tokenizer = match tokenizer {
        Some(t) => t,
        None => {
            let t = out.join("tokenizer.json");
            if !t.exists() {
                rho_loader::train::train_bpe(&data, 8192, Some(5000), &t)?;
            }
            t
        }
    };

    // Raw baseline: the same documents, already in memory, encoded one by one on one thread.
    let docs: Vec<String> = sources::discover(&data)?
        .iter()
        .flat_map(|s| sources::open(s, "text"))
        .filter_map(|e| match e {
            Event::Doc { text, .. } => Some(text),
            _ => None,
        })
        .collect();
    let bytes: usize = docs.iter().map(String::len).sum();
    let tk = crate::runtime::load_tokenizer(&tokenizer)?;
    let t0 = Instant::now();
    let mut raw_tokens = 0usize;
    for d in &docs {
        raw_tokens += tk
            .encode_fast(d.as_str(), false)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .len();
    }
    let raw_secs = t0.elapsed().as_secs_f64();
    let raw_mbs = bytes as f64 / raw_secs / 1e6;
    println!(
        "corpus: {} documents, {:.1} MB of text, {} shards ({input})",
        docs.len(),
        bytes as f64 / 1e6,
        sources::discover(&data)?.len()
    );
    println!("| measurement | seconds | tokens/s | text MB/s | vs raw 1 thread |");
    println!("|---|---|---|---|---|");
    println!("| raw `tokenizers` encode, 1 thread, text in memory | {raw_secs:.2} | {:.0} | {raw_mbs:.2} | 1.00x |", raw_tokens as f64 / raw_secs);

    let mut first = None;
    for t in threads {
        let (secs, tokens) = loader_once(&out, &input, &tokenizer, t, seq_len, batch_size).await?;
        let mbs = bytes as f64 / secs / 1e6;
        let base = *first.get_or_insert(mbs);
        println!(
            "| loader end to end, {t} tokenizer thread(s) | {secs:.2} | {:.0} | {mbs:.2} | {:.2}x (self-scaling {:.2}x) |",
            tokens as f64 / secs,
            mbs / raw_mbs,
            mbs / base
        );
    }
    Ok(())
}

/// A loader running in this process.
pub(super) type InProcess = tokio::task::JoinHandle<rho_loader::Result<rho_loader::Report>>;

/// Starts a loader in this process (its config names an `endpoint_file`, removed first) and
/// waits until it listens; its task and the endpoint it bound.
pub(super) async fn start_in_process(
    config: rho_loader::LoaderConfig,
) -> anyhow::Result<(InProcess, String)> {
    let Some(file) = config.endpoint_file.clone() else {
        bail!("an in-process loader needs an `endpoint_file` to say where it listens");
    };
    let _ = std::fs::remove_file(&file);
    let loader = tokio::spawn(rho_loader::run(config, std::future::pending()));
    loop {
        if let Ok(s) = std::fs::read_to_string(&file) {
            return Ok((loader, s));
        }
        if loader.is_finished() {
            bail!("the loader stopped before listening: {:?}", loader.await);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs an in-process loader with `threads` tokenizer threads and consumes its whole stream over
/// loopback; returns (seconds from start to end of stream, real tokens received).
async fn loader_once(
    out: &std::path::Path,
    input: &str,
    tokenizer: &std::path::Path,
    threads: usize,
    seq_len: usize,
    batch_size: usize,
) -> anyhow::Result<(f64, u64)> {
    let endpoint_file = out.join(format!("endpoint-{threads}"));
    let mut config =
        crate::runtime::loader_config(vec![input.to_owned()], tokenizer, seq_len, batch_size)?;
    config.run_id = "bench".into();
    config.threads = threads;
    config.endpoint = crate::runtime::endpoint("tcp://127.0.0.1:0")?;
    config.endpoint_file = Some(endpoint_file);
    config.metrics_interval_secs = 5.0;
    let started = Instant::now();
    let (loader, endpoint) = start_in_process(config).await?;
    let mut consumer = Consumer::connect(&endpoint, "bench", Limits::default())
        .await
        .context("connecting")?;
    consumer.credit(8).await?;
    let mut tokens = 0u64;
    loop {
        match consumer.recv().await? {
            Message::Batch(b) => {
                tokens += b.lengths.iter().map(|&l| u64::from(l)).sum::<u64>();
                consumer.ack(vec![b.seq]).await?;
                consumer.credit(1).await?;
            }
            Message::End(_) => break,
            other => bail!("unexpected `{}`", other.kind()),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    loader.await??;
    Ok((secs, tokens))
}
