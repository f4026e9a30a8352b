//! `rho bench selector`: what the protocol and transport cost a selector.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use rho_protocol::client::Consumer;
use rho_protocol::{Credit, Limits, Message};
use zeromq::{RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::commands::model as model_cmd;

pub async fn run(
    out: PathBuf,
    preset: String,
    seq_len: usize,
    batch_size: usize,
    batches: usize,
    lanes: Option<std::num::NonZeroUsize>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&out)?;
    let out = out.canonicalize()?;
    let (_, tokenizer, vocab) = super::corpus::synthetic_corpus(&out, 2, 3000, 11, 8192)?;
    let model_dir = out.join(format!("ref-{preset}"));
    if !model_dir.join("model.safetensors").exists() {
        let config = model_cmd::preset_config(&preset, vocab, seq_len.max(512))?;
        model_cmd::init_checkpoint(&model_dir, &config, 1)?;
    }
    let model = rho_model::checkpoint::load(&model_dir, &Device::Cpu, DType::F32)?;
    let params: usize = rho_model::checkpoint::read_tensors(&model_dir, &Device::Cpu)?
        .values()
        .map(|t| t.elem_count())
        .sum();
    let tokens_per_batch = (batch_size * seq_len) as f64;
    println!("reference model `{preset}`: {:.1}M parameters, vocabulary {vocab}; batches of {batch_size} x {seq_len} tokens", params as f64 / 1e6);

    // 1. Bare in-process forward on batches of the same shape (after one warm-up batch).
    let window = seq_len + 1;
    let ids: Vec<u32> = (0..batch_size * window)
        .map(|i| ((i * 7919) % vocab) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (batch_size, window), &Device::Cpu)?;
    rho_model::per_token_loss(&model, &ids, rho_model::ForwardMode::Fused, None)?;
    let bare = || -> anyhow::Result<f64> {
        let t0 = Instant::now();
        for _ in 0..batches {
            rho_model::per_token_loss(&model, &ids, rho_model::ForwardMode::Fused, None)?;
        }
        Ok(tokens_per_batch * batches as f64 / t0.elapsed().as_secs_f64())
    };
    let before = bare()?;

    // 2. The same model in a `rho selector` process fed by a `rho loader` process; this process
    //    is the trainer. Throughput is measured between the first and the last delivery.
    let piped = pipeline(
        &out,
        &model_dir,
        &tokenizer,
        seq_len,
        batch_size,
        batches + 1,
        lanes,
    )
    .await?;

    // 3. The bare forward again, so that drift of the machine shows.
    let after = bare()?;
    let bare = (before + after) / 2.0;

    // The lanes the selector process resolves, as it does (the same threads: every core).
    let threads = rayon::current_num_threads();
    let n = rho_model::lanes::resolve(lanes, true, threads);
    println!("| measurement | tokens/s | vs bare forward |");
    println!("|---|---|---|");
    println!("| bare in-process forward + per-token loss, one batch at a time on {threads} threads (before / after the pipeline: {before:.0} / {after:.0}) | {bare:.0} | 1.000x |");
    println!("| `rho selector` process ({n} lane{}), fed by `rho loader`, delivered over loopback | {piped:.0} | {:.3}x |", if n == 1 { "" } else { "s" }, piped / bare);
    if n == 1 {
        println!(
            "overhead of protocol and transport: {:.1}%",
            (1.0 - piped / bare) * 100.0
        );
    } else {
        println!("the selector scores {n} batches side by side, each on its share of the {threads} threads (`--lanes 1` measures the protocol's overhead alone)");
    }
    Ok(())
}

fn credit(peer: &Bytes, run_id: &str, n: u32) -> anyhow::Result<ZmqMessage> {
    let mut frames = vec![peer.clone()];
    frames.extend(
        Message::Credit(Credit {
            run_id: run_id.into(),
            n,
            rank: None,
        })
        .encode(),
    );
    ZmqMessage::try_from(frames).map_err(|e| anyhow::anyhow!("{e}"))
}

async fn pipeline(
    out: &Path,
    model: &Path,
    tokenizer: &Path,
    seq_len: usize,
    batch_size: usize,
    batches: usize,
    lanes: Option<std::num::NonZeroUsize>,
) -> anyhow::Result<f64> {
    let run_id = "bench-selector";
    let endpoint_file = out.join("loader.endpoint");
    let _ = std::fs::remove_file(&endpoint_file);
    let mut loader_cfg = crate::runtime::loader_config(
        vec![out.join("data").to_string_lossy().into_owned()],
        tokenizer,
        seq_len,
        batch_size,
    )?;
    loader_cfg.run_id = run_id.into();
    loader_cfg.threads = 1;
    loader_cfg.endpoint = crate::runtime::endpoint("tcp://127.0.0.1:0")?;
    loader_cfg.endpoint_file = Some(endpoint_file.clone());
    loader_cfg.exit_when_done = false;
    std::fs::write(out.join("loader.json"), serde_json::to_string(&loader_cfg)?)?;
    let exe = std::env::current_exe()?;
    let mut loader = tokio::process::Command::new(&exe)
        .args(["loader", "--config"])
        .arg(out.join("loader.json"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !endpoint_file.exists() {
        if Instant::now() > deadline {
            bail!("the loader did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let loader_ep = std::fs::read_to_string(&endpoint_file)?;
    let mut router = RouterSocket::new();
    let trainer_ep = router.bind("tcp://127.0.0.1:0").await?.to_string();
    let mut selector_cfg =
        rho_selector::SelectorConfig::new(model.to_path_buf(), tokenizer.to_path_buf());
    selector_cfg.run_id = run_id.into();
    selector_cfg.loader = crate::runtime::endpoint(&loader_ep)?;
    selector_cfg.trainer = crate::runtime::endpoint(&trainer_ep)?;
    selector_cfg.lanes = lanes;
    std::fs::write(
        out.join("selector.json"),
        serde_json::to_string(&selector_cfg)?,
    )?;
    let mut selector = tokio::process::Command::new(&exe)
        .args(["selector", "--config"])
        .arg(out.join("selector.json"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut acker = Consumer::connect(&loader_ep, run_id, Limits::default()).await?;
    let mut first: Option<Instant> = None;
    let mut tokens = 0f64;
    let mut got = 0;
    while got < batches {
        let m = tokio::time::timeout(Duration::from_secs(300), router.recv())
            .await
            .context("the selector went silent")??;
        let mut frames = m.into_vec();
        let peer = frames.remove(0);
        match Message::decode(&frames, &Limits::default())? {
            Message::Heartbeat(_) => router.send(credit(&peer, run_id, 2)?).await?,
            Message::Scored(s) => {
                got += 1;
                if first.is_none() {
                    first = Some(Instant::now());
                } else {
                    tokens += s.batch.target_count() as f64;
                }
                acker.ack(vec![s.batch.seq]).await?;
                router.send(credit(&peer, run_id, 1)?).await?;
            }
            other => bail!("unexpected `{}`", other.kind()),
        }
    }
    let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    let _ = selector.kill().await;
    let _ = loader.kill().await;
    Ok(tokens / secs.max(1e-9))
}
