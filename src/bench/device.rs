//! `rho bench device`: what a device does with rho's models, as one JSON: per-token losses on
//! the device against the CPU in f32 and half precision on the committed fixtures, reference
//! throughput and memory at a chosen size, causal-LM and SLM training steps, and a short
//! `rho run` with the selector and the trainer on the device. `bench/gpu/check.sh` runs it on a
//! GPU machine; with `--device cpu` at tiny sizes it runs in the test suite.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use rho_model::{checkpoint, per_token_loss, DTypeSpec, DeviceSpec, ForwardMode};
use rho_trainer::optim::OptimizerConfig;
use rho_trainer::{Backend, CandleBackend, RatioSchedule, Scope, ScoreRule, Selection};
use serde::Serialize;

use crate::commands::model as model_cmd;

#[derive(Args)]
pub struct DeviceArgs {
    /// The device to check: `cuda`, `cuda:N` or `cpu`.
    #[arg(long, default_value = "cuda")]
    pub device: DeviceSpec,
    /// The half-precision dtype to check (default: bf16 on a GPU, f16 on the CPU).
    #[arg(long)]
    pub half: Option<DTypeSpec>,
    /// Checkpoint fixtures with `ref_losses.json` (each a directory).
    #[arg(long, default_value = "model/tests/fixtures")]
    pub fixtures: PathBuf,
    /// Working directory (models, corpus, the run) and where `device-check.json` is written.
    #[arg(long, default_value = "runs/device-check")]
    pub out: PathBuf,
    /// Reference size for the throughput measurement (`1b`: TinyLlama-1.1B's shape).
    #[arg(long, default_value = "1b")]
    pub preset: rho_model::Preset,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Batches timed (after one warm-up batch).
    #[arg(long, default_value_t = 5)]
    pub batches: usize,
    /// Model size of the training steps.
    #[arg(long, default_value = "20m")]
    pub train_preset: rho_model::Preset,
    /// Rows x tokens of a training step.
    #[arg(long, default_value_t = 4)]
    pub train_batch_size: usize,
    #[arg(long, default_value_t = 512)]
    pub train_seq_len: usize,
    /// The device's dense half-precision peak in TFLOP/s, for model FLOPs utilization.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Leave out the short `rho run`.
    #[arg(long)]
    pub no_run: bool,
}

/// Per-token losses of one fixture on the device, against the CPU in f32.
#[derive(Serialize)]
struct FixtureCheck {
    name: String,
    f32_max_abs_diff: f32,
    half_max_abs_diff: f32,
    half_mean_abs_diff: f32,
    f32_tolerance: f32,
    half_tolerance: f32,
    ok: bool,
}

/// Reference throughput at one size.
#[derive(Serialize)]
struct Throughput {
    preset: String,
    parameters: usize,
    dtype: String,
    batch_size: usize,
    seq_len: usize,
    load_secs: f64,
    tokens_per_s: f64,
    /// `2 x (parameters of every matrix but the embedding) + 4 x layers x seq_len x attention
    /// width`: the forward's multiply-adds per token, attention counted over the full square.
    model_flops_per_token: f64,
    tflops: f64,
    mfu: Option<f64>,
    /// The process's peak resident memory after loading the weights, and after scoring.
    host_peak_kib_after_load: Option<u64>,
    host_peak_kib_after_scoring: Option<u64>,
    weights_bytes: u64,
}

/// Training steps of one mode.
#[derive(Serialize)]
struct Training {
    mode: String,
    steps: u64,
    seconds_per_step: f64,
    tokens_per_s: f64,
    last_loss: f32,
    ok: bool,
}

/// The short `rho run`.
#[derive(Serialize)]
struct RunCheck {
    ok: bool,
    steps: u64,
    seconds: f64,
    error: Option<String>,
}

#[derive(Serialize)]
struct Report {
    device: String,
    half: String,
    fixtures: Vec<FixtureCheck>,
    throughput: Throughput,
    training: Vec<Training>,
    run: Option<RunCheck>,
    ok: bool,
}

pub async fn run(a: DeviceArgs) -> anyhow::Result<()> {
    let half = a.half.unwrap_or(match a.device {
        DeviceSpec::Cpu => DTypeSpec::F16,
        DeviceSpec::Cuda(_) => DTypeSpec::Bf16,
    });
    let half_dtype = half.on(a.device)?;
    let device = a.device.open()?;
    std::fs::create_dir_all(&a.out)?;
    let out = a.out.canonicalize()?;

    let fixtures = fixtures(&a.fixtures, &device, half_dtype)?;
    eprintln!("fixtures: {} checked", fixtures.len());
    let throughput = throughput(&a, &out, &device, half_dtype)?;
    eprintln!(
        "reference `{}` in {half}: {:.0} tokens/s",
        a.preset, throughput.tokens_per_s
    );
    let training = training(&a, &out, &device)?;
    let run = if a.no_run {
        None
    } else {
        Some(short_run(&out, a.device, half).await?)
    };
    let ok = fixtures.iter().all(|f| f.ok)
        && training.iter().all(|t| t.ok)
        && run.as_ref().is_none_or(|r| r.ok);
    let report = Report {
        device: a.device.to_string(),
        half: half.to_string(),
        fixtures,
        throughput,
        training,
        run,
        ok,
    };
    let path = out.join("device-check.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    eprintln!("written to {}", path.display());
    if !ok {
        bail!("the device check failed: see {}", path.display());
    }
    Ok(())
}

/// Largest and mean absolute difference.
fn distance(a: &[f32], b: &[f32]) -> (f32, f32) {
    let d: Vec<f32> = a.iter().zip(b).map(|(x, y)| (x - y).abs()).collect();
    let max = d.iter().copied().fold(0f32, f32::max);
    (max, d.iter().sum::<f32>() / d.len().max(1) as f32)
}

fn fixtures(dir: &Path, device: &Device, half: DType) -> anyhow::Result<Vec<FixtureCheck>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("fixtures {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("ref_losses.json").is_file())
        .collect();
    names.sort();
    if names.is_empty() {
        bail!("no fixture with a ref_losses.json under {}", dir.display());
    }
    // Tolerances: f32 on another device sums in another order (1e-3 leaves room for TF32-free
    // cuBLAS; the CPU agrees exactly). Half precision rounds activations to 11 (f16) or 8 (bf16)
    // significant bits: f16 lands within 2.4e-3 of f32 on these fixtures (see
    // model/tests/reference.rs), bf16 has 8 times f16's rounding step.
    let half_tolerance = if half == DType::BF16 { 5e-2 } else { 5e-3 };
    let mut out = Vec::new();
    for fixture in names {
        #[derive(serde::Deserialize)]
        struct Ref {
            input_ids: Vec<Vec<u32>>,
        }
        let text = std::fs::read_to_string(fixture.join("ref_losses.json"))?;
        let r: Ref = serde_json::from_str(&text)
            .with_context(|| format!("{}/ref_losses.json", fixture.display()))?;
        let (b, w) = (r.input_ids.len(), r.input_ids[0].len());
        let ids: Vec<u32> = r.input_ids.concat();
        let losses = |device: &Device, dtype: DType| -> anyhow::Result<Vec<f32>> {
            let model = checkpoint::load(&fixture, device, dtype)?;
            let ids = Tensor::from_slice(&ids, (b, w), device)?;
            Ok(per_token_loss(&model, &ids, ForwardMode::Fused, None)?
                .flatten_all()?
                .to_vec1()?)
        };
        let cpu = losses(&Device::Cpu, DType::F32)?;
        let (f32_max, _) = distance(&losses(device, DType::F32)?, &cpu);
        let (half_max, half_mean) = distance(&losses(device, half)?, &cpu);
        let f32_tolerance = 1e-3;
        out.push(FixtureCheck {
            name: fixture
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            ok: f32_max <= f32_tolerance && half_max <= half_tolerance,
            f32_max_abs_diff: f32_max,
            half_max_abs_diff: half_max,
            half_mean_abs_diff: half_mean,
            f32_tolerance,
            half_tolerance,
        });
    }
    Ok(out)
}

/// The peak resident memory of this process so far.
fn peak_kib() -> Option<u64> {
    crate::supervise::launch::status_kib("self", "VmHWM")
}

fn throughput(
    a: &DeviceArgs,
    out: &Path,
    device: &Device,
    dtype: DType,
) -> anyhow::Result<Throughput> {
    let vocab = 32000;
    let dir = out.join(format!("ref-{}", a.preset));
    if !dir.join("model.safetensors").exists() {
        eprintln!("writing a `{}` checkpoint to {}", a.preset, dir.display());
        let config = a.preset.hf_config(vocab, a.seq_len.max(512) + 1);
        model_cmd::init_checkpoint(&dir, &config, 1)?;
    }
    let t0 = Instant::now();
    let model = checkpoint::load(&dir, device, dtype)?;
    let load_secs = t0.elapsed().as_secs_f64();
    let host_peak_kib_after_load = peak_kib();
    let c = model.config().clone();
    let params = c.vocab_size * c.hidden_size * 2
        + c.num_layers
            * (c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
                + 3 * c.hidden_size * c.intermediate_size
                + 2 * c.hidden_size)
        + c.hidden_size;
    let matrices = c.matmul_parameters();
    let flops_per_token =
        2.0 * matrices as f64 + 4.0 * (c.num_layers * a.seq_len * c.num_heads * c.head_dim) as f64;
    let window = a.seq_len + 1;
    let ids: Vec<u32> = (0..a.batch_size * window)
        .map(|i| ((i * 7919) % vocab) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (a.batch_size, window), device)?;
    let score = || -> anyhow::Result<()> {
        let l = per_token_loss(&model, &ids, ForwardMode::Fused, None)?;
        // Reading one value back waits for the device.
        l.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    };
    score()?; // warm-up: kernels loaded, buffers allocated
    let t0 = Instant::now();
    for _ in 0..a.batches {
        score()?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let tokens_per_s = (a.batch_size * a.seq_len * a.batches) as f64 / secs;
    let tflops = tokens_per_s * flops_per_token / 1e12;
    Ok(Throughput {
        preset: a.preset.to_string(),
        parameters: params,
        dtype: dtype.as_str().into(),
        batch_size: a.batch_size,
        seq_len: a.seq_len,
        load_secs,
        tokens_per_s,
        model_flops_per_token: flops_per_token,
        tflops,
        mfu: a.peak_tflops.map(|p| tflops / p),
        host_peak_kib_after_load,
        host_peak_kib_after_scoring: peak_kib(),
        weights_bytes: (params * dtype.size_in_bytes()) as u64,
    })
}

fn training(a: &DeviceArgs, out: &Path, device: &Device) -> anyhow::Result<Vec<Training>> {
    let vocab = 8192;
    let dir = out.join(format!("train-{}", a.train_preset));
    if !dir.join("model.safetensors").exists() {
        let config = a
            .train_preset
            .hf_config(vocab, a.train_seq_len.max(512) + 1);
        model_cmd::init_checkpoint(&dir, &config, 3)?;
    }
    let optim = OptimizerConfig {
        lr: 1e-4,
        ..Default::default()
    };
    let (rows, len) = (a.train_batch_size, a.train_seq_len);
    let mut results = Vec::new();
    for (mode, score, ratio) in [
        ("causal LM", ScoreRule::None, 1.0),
        ("SLM", ScoreRule::Excess, 0.6),
    ] {
        let selection = Selection {
            score,
            scope: Scope::Batch,
            schedule: RatioSchedule::Constant { ratio },
            seed: 0,
            ..Selection::default()
        };
        // The trainer's defaults on this device.
        let mut backend = CandleBackend::from_checkpoint(&dir, device, optim)?.split(None, None)?;
        let steps = 3u64;
        backend.step(
            0,
            &super::trainer::step_input(rows, len, vocab, 0),
            &selection,
        )?;
        let t0 = Instant::now();
        let mut last = f32::NAN;
        for step in 1..=steps {
            let input = super::trainer::step_input(rows, len, vocab, step);
            last = backend.step(step, &input, &selection)?.loss_selected;
        }
        let secs = t0.elapsed().as_secs_f64();
        results.push(Training {
            mode: mode.into(),
            steps,
            seconds_per_step: secs / steps as f64,
            tokens_per_s: (rows * len) as f64 * steps as f64 / secs,
            last_loss: last,
            ok: last.is_finite(),
        });
    }
    Ok(results)
}

/// `rho run` for a few steps on a small synthetic corpus, selector and trainer on the device.
async fn short_run(out: &Path, device: DeviceSpec, half: DTypeSpec) -> anyhow::Result<RunCheck> {
    let (data, tokenizer, vocab) = super::corpus::synthetic_corpus(out, 1, 200, 5, 2048)?;
    for (name, seed) in [("run-ref", 11), ("run-init", 12)] {
        let dir = out.join(name);
        if !dir.join("model.safetensors").exists() {
            model_cmd::init_checkpoint(&dir, &rho_model::Preset::Tiny.hf_config(vocab, 512), seed)?;
        }
    }
    let run_dir = out.join("run");
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir)?;
    }
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let config = serde_json::json!({
        "run_dir": s(&run_dir),
        "loader": {"run_id": "device-check", "data": {"paths": [s(&data)]},
                   "tokenizer": s(&tokenizer), "seq_len": 128, "batch_size": 4, "epochs": 1},
        "selector": {"model": s(&out.join("run-ref")), "tokenizer": s(&tokenizer),
                     "device": device.to_string(), "dtype": half.to_string()},
        "trainer": {"model": s(&out.join("run-init")), "device": device.to_string(),
                    "selection": {"score": "excess"}, "optimizer": {"lr": 0.003},
                    "checkpoint": {"dir": s(&run_dir.join("checkpoints")), "every": 1000}},
    });
    let path = out.join("run.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    let t0 = Instant::now();
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .args(["run", &s(&path)])
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    let seconds = t0.elapsed().as_secs_f64();
    let steps = rho_common::jsonl::read_last::<rho_trainer::StepMetrics>(
        &run_dir.join("trainer.metrics.jsonl"),
    )
    .map_or(0, |m| m.step);
    let ok = output.status.success() && steps > 0;
    let stderr = String::from_utf8_lossy(&output.stderr);
    Ok(RunCheck {
        ok,
        steps,
        seconds,
        error: (!ok).then(|| stderr.lines().rev().take(5).collect::<Vec<_>>().join(" | ")),
    })
}
