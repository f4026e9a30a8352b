//! `rho demo`: the embedded default, end to end with nothing downloaded.
//!
//! It writes a synthetic OpenWebMath-style corpus, trains a byte-level BPE tokenizer on it,
//! starts a real `rho loader` process on a loopback endpoint, and consumes the whole stream the
//! way a selector or trainer does (credits, batches, acknowledgements), then reports what
//! flowed. The reference-scoring and training stages join this pipeline as they are built.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use rho_protocol::client::Consumer;
use rho_protocol::{Limits, Message};

use crate::corpus::{self, SynthArgs};

#[derive(Args)]
pub struct DemoArgs {
    /// Run directory (data, tokenizer, configs, metrics, report).
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A smaller corpus, for tests.
    #[arg(long)]
    pub quick: bool,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let out = &args.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let out = out.canonicalize()?;
    let data = corpus::data_dir(&out);
    let (shards, docs) = if args.quick { (2, 150) } else { (4, 1000) };
    eprintln!(
        "[1/3] writing a synthetic corpus ({shards} parquet shards) to {}",
        data.display()
    );
    corpus::write_corpus(&SynthArgs {
        out: data.clone(),
        shards,
        docs_per_shard: docs,
        noise: 0.4,
        seed: args.seed,
    })?;

    let tokenizer = out.join("tokenizer.json");
    eprintln!(
        "[2/3] training a byte-level BPE tokenizer: {}",
        tokenizer.display()
    );
    let data_cfg = rho_loader::DataConfig {
        paths: vec![data.to_string_lossy().into_owned()],
        text_field: "text".into(),
        format: rho_loader::FormatChoice::Auto,
    };
    let trained = rho_loader::train::train_bpe(&data_cfg, 2048, None, &tokenizer)?;

    let endpoint_file = out.join("loader.endpoint");
    let _ = std::fs::remove_file(&endpoint_file);
    let run_id = format!("demo-{}", args.seed);
    let config = serde_json::json!({
        "run_id": run_id,
        "data": {"paths": ["data"]},
        "tokenizer": "tokenizer.json",
        "seq_len": 256,
        "batch_size": 8,
        "seed": args.seed,
        "endpoint": "tcp://127.0.0.1:0",
        "endpoint_file": "loader.endpoint",
        "metrics": "loader.metrics.jsonl",
        "state_dir": "state",
    });
    let config_path = out.join("loader.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)?;

    eprintln!("[3/3] starting `rho loader` and consuming its stream");
    let exe = std::env::current_exe()?;
    let log = std::fs::File::create(out.join("loader.log"))?;
    let mut child = tokio::process::Command::new(exe)
        .arg("loader")
        .arg("--config")
        .arg(&config_path)
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting the loader process")?;
    let endpoint = wait_for_file(&endpoint_file, Duration::from_secs(60)).await?;

    let consume_started = Instant::now();
    let mut consumer = Consumer::connect(&endpoint, &run_id, Limits::default()).await?;
    consumer.credit(4).await?;
    let (mut batches, mut tokens, mut docs_started) = (0u64, 0u64, 0u64);
    let mut sample = None;
    let total = loop {
        match consumer.recv().await? {
            Message::Batch(b) => {
                batches += 1;
                tokens += b.lengths.iter().map(|&l| u64::from(l)).sum::<u64>();
                docs_started += b.doc_starts.iter().map(|s| s.len() as u64).sum::<u64>();
                if sample.is_none() {
                    sample = Some(b.row(0)[..b.lengths[0].min(48) as usize].to_vec());
                }
                consumer.ack(vec![b.seq]).await?;
                consumer.credit(1).await?;
            }
            Message::End(e) => break e.total,
            other => bail!("unexpected `{}` message from the loader", other.kind()),
        }
    };
    let consume_secs = consume_started.elapsed().as_secs_f64();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
    if !status.success() {
        bail!(
            "the loader exited with {status}; see {}",
            out.join("loader.log").display()
        );
    }

    let tk = tokenizers::Tokenizer::from_file(&tokenizer).map_err(|e| anyhow::anyhow!("{e}"))?;
    let sample_text = sample
        .map(|ids| tk.decode(&ids, false).unwrap_or_default())
        .unwrap_or_default();
    let report = serde_json::json!({
        "batches": batches,
        "stream_total": total,
        "tokens": tokens,
        "documents_started": docs_started,
        "tokenizer_vocab": trained.vocab_size,
        "consume_seconds": consume_secs,
        "tokens_per_second": tokens as f64 / consume_secs.max(1e-9),
        "wall_seconds": started.elapsed().as_secs_f64(),
    });
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("rho demo: {batches} batches, {tokens} tokens streamed from the loader in {:.1} ms ({:.0} tokens/s)", consume_secs * 1e3, tokens as f64 / consume_secs.max(1e-9));
    println!(
        "first window begins: {:?}",
        sample_text.chars().take(160).collect::<String>()
    );
    println!(
        "run directory: {} (report.json, loader.metrics.jsonl, loader.log)",
        out.display()
    );
    if batches != total {
        bail!("received {batches} batches but the stream announced {total}");
    }
    Ok(())
}

async fn wait_for_file(path: &std::path::Path, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.is_empty() {
                return Ok(s.trim().to_string());
            }
        }
        if Instant::now() > deadline {
            bail!("{} did not appear within {timeout:?}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
