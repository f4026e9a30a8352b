//! `rho demo`: the paper's effect, end to end, with nothing downloaded.
//!
//! 1. Three synthetic OpenWebMath-style sets from disjoint seeds: a small curated clean set, a
//!    large noisy training corpus and a held-out clean set (see `synth/`).
//! 2. A byte-level BPE tokenizer trained on them; two random initializations.
//! 3. Three real pipelines, each a `rho run` with its loader, selectors and trainer processes:
//!    the reference model, trained by plain causal LM on the curated set; then, from one
//!    initialization, on one noisy stream, with one token budget, a causal-LM baseline and an
//!    SLM model (k = 0.6, excess loss) scored by a selector process running the reference.
//!    Both evaluate on the held-out set as they train.
//! 4. A report in the run directory (`report/`): the table, the loss curves (SVG and
//!    PNG), a page of sample documents colored by what SLM selects, and how much of what each
//!    rule selects is noise.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::json;

pub mod plan;
pub mod report;

use crate::commands::model as model_cmd;
use crate::supervise::RunOutcome;
use crate::synth::{self as corpus, SynthArgs};

pub use plan::DemoArgs;
use plan::Plan;

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let plan = Plan::new(&args);
    if !(0.0..=1.0).contains(&plan.ratio) || plan.ratio == 0.0 {
        bail!("--ratio must be in (0, 1], got {}", plan.ratio);
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let out = args.out.canonicalize()?;
    let stages = 7;
    let stage = |n: usize, what: &str| eprintln!("[{n}/{stages}] {what}");

    // 1. Corpora.
    let data = corpus::data_dir(&out);
    let sets = [
        ("curated", plan.curated_docs, 0.0, 1u64),
        ("train", plan.train_docs, plan.noise, 2),
        ("heldout", plan.heldout_docs, 0.0, 3),
    ];
    stage(
        1,
        &format!(
            "writing synthetic OpenWebMath-style shards to {} (curated clean {}, noisy training {}, held-out clean {} documents)",
            data.display(),
            plan.curated_docs,
            plan.train_docs,
            plan.heldout_docs
        ),
    );
    let mut synth = Vec::new();
    for (name, docs, noise, salt) in sets {
        let shards = if docs >= 2000 { 4 } else { 1 };
        let a = SynthArgs {
            out: data.join(name),
            shards,
            docs_per_shard: docs.div_ceil(shards),
            noise,
            seed: args.seed.wrapping_mul(4).wrapping_add(salt),
        };
        let _ = std::fs::remove_dir_all(&a.out);
        corpus::write_corpus(&a)?;
        synth.push(a);
    }
    let train_paths = match &args.data {
        Some(d) => vec![absolute(d)?],
        None => vec![synth[1].out.to_string_lossy().into_owned()],
    };

    // 2. Tokenizer.
    let tokenizer = out.join("tokenizer.json");
    stage(
        2,
        &format!(
            "training a byte-level BPE tokenizer of {} tokens: {}",
            plan.vocab,
            tokenizer.display()
        ),
    );
    let mut tok_paths = train_paths.clone();
    tok_paths.push(synth[0].out.to_string_lossy().into_owned());
    let trained = rho_loader::train::train_bpe(
        &rho_loader::DataConfig {
            paths: tok_paths,
            text_field: "text".into(),
            format: rho_loader::FormatChoice::Auto,
        },
        plan.vocab,
        Some(20_000),
        &tokenizer,
    )?;

    // 3. Initial weights: one for the reference, one shared by both target models.
    stage(
        3,
        &format!(
            "initializing `{}` models (vocabulary {})",
            plan.preset, trained.vocab_size
        ),
    );
    let models = out.join("models");
    let config = model_cmd::preset_config(plan.preset, trained.vocab_size, plan.seq_len + 1)?;
    let reference_init = models.join("reference-init");
    let target_init = models.join("target-init");
    model_cmd::init_checkpoint(&reference_init, &config, args.seed.wrapping_add(101))?;
    model_cmd::init_checkpoint(&target_init, &config, args.seed.wrapping_add(202))?;

    let heldout_loader = out.join("heldout-loader.json");
    std::fs::write(
        &heldout_loader,
        serde_json::to_string_pretty(&json!({
            "run_id": "demo-heldout",
            "data": {"paths": [synth[2].out]},
            "tokenizer": tokenizer,
            "seq_len": plan.seq_len,
            "batch_size": plan.batch,
            "shuffle_window": 1,
        }))?,
    )?;

    // 4. The reference model: plain causal LM on the curated set.
    stage(
        4,
        &format!(
            "training the reference model: {} steps of causal LM on the curated set (`rho run`)",
            plan.reference_steps
        ),
    );
    let pipes = Pipelines {
        out: &out,
        plan: &plan,
        seed: args.seed,
        tokenizer: &tokenizer,
        heldout_loader: &heldout_loader,
    };
    let curated = [synth[0].out.to_string_lossy().into_owned()];
    let reference = pipes
        .run(
            "reference",
            &curated,
            &reference_init,
            plan.reference_steps,
            None,
        )
        .await?;
    let reference_model = final_model(&reference)?;

    // 5. and 6. The two target models, same start, same stream, same budget.
    stage(
        5,
        &format!(
            "training the causal-LM baseline: {} steps on the noisy corpus (`rho run`)",
            plan.steps
        ),
    );
    let causal = pipes
        .run("causal", &train_paths, &target_init, plan.steps, None)
        .await?;
    stage(
        6,
        &format!(
            "training with SLM (k = {}): {} steps on the same stream, scored by a selector process (`rho run`)",
            plan.ratio, plan.steps
        ),
    );
    let slm = pipes
        .run(
            "slm",
            &train_paths,
            &target_init,
            plan.steps,
            Some(&reference_model),
        )
        .await?;

    // 7. The report.
    stage(7, "writing the report");
    let sample_docs = if args.data.is_none() {
        Some(corpus::shard_docs(&synth[1], 0))
    } else {
        None
    };
    let inputs = report::Inputs {
        out: &out,
        plan: &plan,
        seed: args.seed,
        tokenizer: &tokenizer,
        reference_model: &reference_model,
        slm_model: &final_model(&slm)?,
        runs: [&reference, &causal, &slm],
        sample_docs: sample_docs.as_deref(),
        started,
    };
    let report = report::write(&inputs)?;
    println!("{}", report::summary_text(&report, &out));
    Ok(())
}

fn absolute(path: &str) -> anyhow::Result<String> {
    let p = Path::new(path);
    Ok(if p.is_absolute() {
        path.to_string()
    } else {
        std::env::current_dir()?
            .join(p)
            .to_string_lossy()
            .into_owned()
    })
}

/// The model directory of a run's last checkpoint.
fn final_model(run: &RunOutcome) -> anyhow::Result<PathBuf> {
    let dir = run.dir.join("checkpoints");
    let pointer = std::fs::read_to_string(dir.join("latest"))
        .with_context(|| format!("run `{}` left no checkpoint in {}", run.name, dir.display()))?;
    Ok(dir.join(pointer.trim()).join("model"))
}

/// What the demo's three pipelines share.
struct Pipelines<'a> {
    out: &'a Path,
    plan: &'a Plan,
    seed: u64,
    tokenizer: &'a Path,
    heldout_loader: &'a Path,
}

impl Pipelines<'_> {
    /// Writes a run config and runs it with `rho run`, its progress on this terminal: causal LM,
    /// or SLM scored by a selector when `reference` is given.
    async fn run(
        &self,
        name: &str,
        data: &[String],
        init: &Path,
        steps: u64,
        reference: Option<&Path>,
    ) -> anyhow::Result<RunOutcome> {
        let (out, plan, seed, tokenizer, heldout_loader) = (
            self.out,
            self.plan,
            self.seed,
            self.tokenizer,
            self.heldout_loader,
        );
        let dir = out.join("runs").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let selection = match reference {
            Some(_) => json!({"score": "excess", "scope": "batch",
                          "schedule": {"kind": "constant", "ratio": plan.ratio}}),
            None => json!({"score": "none"}),
        };
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        // With a selector, the trainer and the selector share the cores; alone, the trainer has them.
        let trainer_threads = if reference.is_some() {
            (cores / 2).max(1)
        } else {
            cores
        };
        let selector = reference.map(|r| {
            json!({
                "model": r,
                "tokenizer": tokenizer,
                "threads": (cores - trainer_threads).max(1),
            })
        });
        let config = json!({
            "run_dir": ".",
            "selector": selector,
            "selectors": 1,
            "loader": {
                "run_id": format!("demo-{name}-{seed}"),
                "data": {"paths": data},
                "tokenizer": tokenizer,
                "seq_len": plan.seq_len,
                "batch_size": plan.batch,
                "seed": seed,
                "epochs": 1000,
                "shuffle_window": 64,
                "threads": 1,
            },
            "trainer": {
                "model": init,
                "selection": selection,
                "optimizer": {
                    "lr": plan.lr,
                    "weight_decay": 0.1,
                    "warmup_steps": (steps / 20).max(1),
                    "decay_steps": steps,
                    "min_lr_ratio": 0.1,
                    "grad_clip": 1.0,
                },
                "max_steps": steps,
                "eval": {"loader_config": heldout_loader, "every": plan.eval_every, "max_batches": plan.eval_batches},
                "threads": trainer_threads,
            },
        });
        crate::supervise::launch(&dir, name, &config).await
    }
}
