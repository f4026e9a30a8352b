//! `rho bench pipeline`: what the pipeline buys, one core per process.
//!
//! - plain causal LM: `rho run`, the trainer alone on one core, straight from the loader;
//! - pipelined SLM: `rho run`, the selector on one core, the trainer on another;
//! - sequential SLM: the reference forward and the training step one after the other in one
//!   process on one core, as single-process implementations do (batches read beforehand);
//! - selector scaling: a reference larger than anything trained, a null-backend trainer, and 1
//!   then 2 selectors of one core each;
//! - memory: the resident size of every process of a long pipelined SLM run, sampled twice a
//!   second.
//!
//! Throughputs are steady-state: the first fifth of the steps is left out.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};
use clap::Args;
use serde_json::{json, Value};

use crate::commands::model as model_cmd;
use crate::supervise::{launch, RunOutcome};
use rho_loader::LoaderConfig;
use rho_protocol::Endpoint;
use rho_selector::scorer::{CandleScorer, Scorer};
use rho_selector::SelectorConfig;
use rho_trainer::optim::OptimizerConfig;
use rho_trainer::{Backend, CandleBackend, RatioSchedule, Scope, ScoreRule, Selection, StepInput};

#[derive(Args)]
pub struct PipelineArgs {
    /// Working directory (corpus, tokenizer, models, runs).
    #[arg(long, default_value = "runs/bench-pipeline")]
    pub out: PathBuf,
    /// Size of the trained model and of its reference.
    #[arg(long, default_value = "small")]
    pub preset: String,
    /// Size of the reference in the selector-scaling runs (larger than `preset`).
    #[arg(long, default_value = "20m")]
    pub scaling_preset: String,
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Training steps of each throughput run.
    #[arg(long, default_value_t = 40)]
    pub steps: u64,
    /// Batches of each selector-scaling run.
    #[arg(long, default_value_t = 40)]
    pub scaling_batches: u64,
    /// Steps of the long run whose memory is sampled.
    #[arg(long, default_value_t = 300)]
    pub long_steps: u64,
}

struct Setup {
    data: PathBuf,
    tokenizer: PathBuf,
    init: PathBuf,
    reference: PathBuf,
    scaling_reference: PathBuf,
}

fn setup(a: &PipelineArgs, out: &Path) -> anyhow::Result<Setup> {
    let (data, tokenizer, vocab) = super::corpus::synthetic_corpus(out, 4, 3000, 21, 2048)?;
    let model = |name: &str, preset: &str, seed: u64| -> anyhow::Result<PathBuf> {
        let dir = out.join(name);
        if !dir.join("model.safetensors").exists() {
            let config = model_cmd::preset_config(preset, vocab, a.seq_len + 1)?;
            model_cmd::init_checkpoint(&dir, &config, seed)?;
        }
        Ok(dir)
    };
    Ok(Setup {
        init: model(&format!("init-{}", a.preset), &a.preset, 1)?,
        reference: model(&format!("ref-{}", a.preset), &a.preset, 2)?,
        scaling_reference: model(&format!("ref-{}", a.scaling_preset), &a.scaling_preset, 3)?,
        data,
        tokenizer,
    })
}

/// What differs between the runs of the benchmark.
struct Variant<'a> {
    selection: &'a Value,
    backend: &'a str,
    /// The selectors' reference model (none: no selectors).
    reference: Option<&'a Path>,
    selectors: usize,
    steps: u64,
    /// The selectors also write a scored cache here.
    cache_out: Option<&'a Path>,
    /// The loader serves this scored cache, straight to the trainer.
    scored: Option<&'a Path>,
}

impl Default for Variant<'_> {
    fn default() -> Self {
        static NONE: std::sync::LazyLock<Value> =
            std::sync::LazyLock::new(|| json!({"score": "none"}));
        Variant {
            selection: &NONE,
            backend: "candle",
            reference: None,
            selectors: 0,
            steps: 0,
            cache_out: None,
            scored: None,
        }
    }
}

/// The benchmark's loader: its corpus in batches of `--batch-size` x `--seq-len`, one
/// tokenizer thread.
fn loader_config(a: &PipelineArgs, s: &Setup) -> anyhow::Result<LoaderConfig> {
    let mut loader = crate::runtime::loader_config(
        vec![s.data.to_string_lossy().into_owned()],
        &s.tokenizer,
        a.seq_len,
        a.batch_size,
    )?;
    loader.run_id = "bench-pipeline".into();
    loader.threads = 1;
    Ok(loader)
}

/// A run config: the loader, and the trainer and selectors on one thread each.
fn run_config(a: &PipelineArgs, s: &Setup, v: &Variant) -> anyhow::Result<Value> {
    let selector = v.reference.map(|r| {
        let mut selector = SelectorConfig::new(r.to_path_buf(), s.tokenizer.clone());
        selector.threads = Some(1);
        selector.cache_out = v.cache_out.map(Path::to_path_buf);
        selector
    });
    let mut loader = loader_config(a, s)?;
    loader.epochs = NonZeroU32::new(100).context("epochs")?;
    loader.scored = v.scored.map(Path::to_path_buf);
    // Unassigned: `rho run` binds it on a free loopback port.
    loader.endpoint = Endpoint::default();
    Ok(json!({
        "run_dir": ".",
        "selectors": v.selectors,
        "loader": loader,
        "selector": selector,
        "trainer": {
            "backend": v.backend,
            "model": s.init,
            "selection": v.selection,
            "optimizer": {"lr": 1e-3},
            "max_steps": v.steps,
            "threads": 1,
            "source": if v.scored.is_some() { "loader" } else { "auto" },
        },
    }))
}

/// Steady-state tokens/s of a run's trainer, from its per-step metrics.
fn steady_tokens_per_s(run: &RunOutcome, tokens_per_step: f64) -> anyhow::Result<f64> {
    let path = run.dir.join("trainer.metrics.jsonl");
    let points: Vec<(f64, f64)> = rho_common::jsonl::read_all::<rho_trainer::StepMetrics>(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .iter()
        .map(|m| (m.step as f64, m.elapsed_s))
        .collect();
    anyhow::ensure!(points.len() >= 5, "{}: too few steps", path.display());
    let (s0, t0) = points[points.len() / 5];
    let (s1, t1) = points[points.len() - 1];
    Ok((s1 - s0) * tokens_per_step / (t1 - t0).max(1e-9))
}

fn fresh(dir: PathBuf) -> anyhow::Result<PathBuf> {
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Reference forward then training step, one after the other, in this process.
fn sequential(a: &PipelineArgs, s: &Setup, selection: &Selection) -> anyhow::Result<f64> {
    let loader = loader_config(a, s)?;
    let metrics = std::sync::Arc::new(rho_loader::metrics::Metrics::default());
    let mut stream = rho_loader::Stream::new(&loader, metrics)?;
    let mut batches = Vec::new();
    stream.run(0, |b| {
        batches.push(b);
        if batches.len() as u64 >= a.steps {
            rho_loader::Flow::Stop
        } else {
            rho_loader::Flow::Continue
        }
    })?;
    let scorer = CandleScorer::load(&s.reference, &Device::Cpu, DType::F32, None)?;
    let optim = OptimizerConfig {
        lr: 1e-3,
        ..Default::default()
    };
    // The trainer's defaults, as the pipeline's trainer has them.
    let mut backend =
        CandleBackend::from_checkpoint(&s.init, &Device::Cpu, optim)?.split(None, None)?;
    let warm = batches.len() / 5;
    let mut clock = Instant::now();
    let mut tokens = 0u64;
    for (step, batch) in batches.into_iter().enumerate() {
        if step == warm {
            clock = Instant::now();
            tokens = 0;
        }
        let ref_loss = scorer.score(&batch)?;
        tokens += ((batch.window - 1) * batch.rows) as u64;
        backend.step(
            step as u64,
            &StepInput {
                batch,
                ref_loss: Some(ref_loss),
            },
            selection,
        )?;
    }
    Ok(tokens as f64 / clock.elapsed().as_secs_f64())
}

/// Resident MiB of each process at a quarter, half and the end of a run, and the peak.
fn memory_table(run: &RunOutcome) -> Vec<(String, [f64; 4])> {
    run.memory
        .iter()
        .filter(|(_, samples)| samples.len() >= 4)
        .map(|(process, samples)| {
            let at = |f: f64| samples[((samples.len() - 1) as f64 * f) as usize].1 as f64 / 1024.0;
            let peak = samples.iter().map(|s| s.1).max().unwrap_or(0) as f64 / 1024.0;
            (process.clone(), [at(0.25), at(0.5), at(1.0), peak])
        })
        .collect()
}

pub async fn run(a: PipelineArgs) -> anyhow::Result<()> {
    crate::runtime::set_threads(Some(1))?;
    std::fs::create_dir_all(&a.out)?;
    let out = a.out.canonicalize()?;
    let s = setup(&a, &out)?;
    let per_step = (a.batch_size * a.seq_len) as f64;
    let slm = Selection {
        score: ScoreRule::Excess,
        scope: Scope::Batch,
        schedule: RatioSchedule::Constant { ratio: 0.6 },
        seed: 0,
        ..Selection::default()
    };
    let slm_json = serde_json::to_value(&slm)?;
    let runs = Runs {
        a: &a,
        s: &s,
        out: &out,
    };

    let causal = runs
        .launch(
            1,
            "plain causal LM, trainer on one core",
            "causal",
            Variant {
                steps: a.steps,
                ..Default::default()
            },
        )
        .await?;
    let cache_dir = fresh(out.join("cache"))?;
    let pipelined = runs
        .launch(
            2,
            "pipelined SLM, selector and trainer on one core each",
            "pipelined",
            Variant {
                selection: &slm_json,
                reference: Some(&s.reference),
                selectors: 1,
                steps: a.steps,
                cache_out: Some(&cache_dir),
                ..Default::default()
            },
        )
        .await?;
    eprintln!(
        "[3/7] sequential SLM, reference forward and training step in one process on one core"
    );
    let sequential = sequential(&a, &s, &slm)?;
    let what = "SLM from the scored cache the pipelined run wrote, no selector";
    let cached = runs
        .launch(
            4,
            what,
            "cached",
            Variant {
                selection: &slm_json,
                steps: a.steps,
                scored: Some(&cache_dir),
                ..Default::default()
            },
        )
        .await?;
    let cache = rho_common::cache::CacheReader::open(&cache_dir)?;
    let cache_bytes_per_token =
        cache.bytes() as f64 / (cache.len() as f64 * ((a.seq_len + 1) * a.batch_size) as f64);

    let mut scaling = Vec::new();
    for (i, n) in [1usize, 2].into_iter().enumerate() {
        let what = format!(
            "{n} selector(s) with the `{}` reference, null-backend trainer",
            a.scaling_preset
        );
        let run = runs
            .launch(
                5 + i,
                &what,
                &format!("scaling-{n}"),
                Variant {
                    selection: &slm_json,
                    backend: "null",
                    reference: Some(&s.scaling_reference),
                    selectors: n,
                    steps: a.scaling_batches,
                    ..Default::default()
                },
            )
            .await?;
        scaling.push(steady_tokens_per_s(&run, per_step)?);
    }

    let what = format!(
        "a long pipelined SLM run ({} steps), memory sampled",
        a.long_steps
    );
    let long = runs
        .launch(
            7,
            &what,
            "long",
            Variant {
                selection: &slm_json,
                reference: Some(&s.reference),
                selectors: 1,
                steps: a.long_steps,
                ..Default::default()
            },
        )
        .await?;

    let results = Results {
        causal: steady_tokens_per_s(&causal, per_step)?,
        pipelined: steady_tokens_per_s(&pipelined, per_step)?,
        sequential,
        cached: steady_tokens_per_s(&cached, per_step)?,
        cache_bytes_per_token,
        scaling,
        memory: memory_table(&long),
    };
    results.print(&a);
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&results.json())?,
    )?;
    Ok(())
}

/// What the benchmark's runs share.
struct Runs<'a> {
    a: &'a PipelineArgs,
    s: &'a Setup,
    out: &'a Path,
}

impl Runs<'_> {
    /// Stage `n` of the seven: a fresh run directory `name` and the run of `variant` in it.
    async fn launch(
        &self,
        n: usize,
        what: &str,
        name: &str,
        variant: Variant<'_>,
    ) -> anyhow::Result<RunOutcome> {
        eprintln!("[{n}/7] {what}");
        let dir = fresh(self.out.join(name))?;
        launch(&dir, name, &run_config(self.a, self.s, &variant)?).await
    }
}

/// What the benchmark measured: tokens/s of each mode, the cache's size, the selectors'
/// scaling and the long run's memory.
struct Results {
    causal: f64,
    pipelined: f64,
    sequential: f64,
    cached: f64,
    cache_bytes_per_token: f64,
    scaling: Vec<f64>,
    memory: Vec<(String, [f64; 4])>,
}

impl Results {
    /// The tables, on stdout.
    fn print(&self, a: &PipelineArgs) {
        println!(
            "model `{}` trained, reference `{}`; batches of {} x {} tokens; one thread per process",
            a.preset, a.preset, a.batch_size, a.seq_len
        );
        println!("| mode | tokens/s | vs plain causal LM |\n|---|---|---|");
        for (mode, tps) in [
            ("plain causal LM (trainer alone)", self.causal),
            ("pipelined SLM (selector + trainer)", self.pipelined),
            ("sequential SLM (one process)", self.sequential),
            ("SLM from the scored cache (no selector)", self.cached),
        ] {
            println!("| {mode} | {tps:.0} | {:.3}x |", tps / self.causal);
        }
        println!(
            "\nscored cache: {:.2} bytes per token (tokens and reference losses)",
            self.cache_bytes_per_token
        );
        println!(
            "\nselector scaling, `{}` reference, null-backend trainer:\n| selectors | tokens/s | vs 1 |\n|---|---|---|",
            a.scaling_preset
        );
        for (n, tps) in self.scaling.iter().enumerate() {
            println!("| {} | {tps:.0} | {:.2}x |", n + 1, tps / self.scaling[0]);
        }
        println!(
            "\nresident memory (MiB) of a {}-step pipelined SLM run:\n| process | at 25% | at 50% | at the end | peak |\n|---|---|---|---|---|",
            a.long_steps
        );
        for (process, m) in &self.memory {
            println!(
                "| {process} | {:.1} | {:.1} | {:.1} | {:.1} |",
                m[0], m[1], m[2], m[3]
            );
        }
    }

    /// `report.json`.
    fn json(&self) -> Value {
        json!({
            "causal_tokens_per_s": self.causal,
            "pipelined_slm_tokens_per_s": self.pipelined,
            "sequential_slm_tokens_per_s": self.sequential,
            "pipelined_over_causal": self.pipelined / self.causal,
            "sequential_over_causal": self.sequential / self.causal,
            "cached_slm_tokens_per_s": self.cached,
            "cache_bytes_per_token": self.cache_bytes_per_token,
            "scaling_tokens_per_s": self.scaling,
            "memory_mib": self.memory.iter().map(|(p, m)| (p.clone(), json!(m))).collect::<serde_json::Map<_, _>>(),
        })
    }
}
