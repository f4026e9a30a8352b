//! `rho demo`: the paper's effect, end to end, with nothing downloaded.
//!
//! 1. Three synthetic OpenWebMath-style sets from disjoint seeds: a small curated clean set, a
//!    large noisy training corpus and a held-out clean set (see `synth/`).
//! 2. A byte-level BPE tokenizer trained on them; two random initializations.
//! 3. Three real pipelines, each a `rho run` with its loader, selectors and trainer processes:
//!    the reference model, trained by plain causal LM on the curated set; then, from one
//!    initialization, on one noisy stream, with one token budget, a causal-LM baseline and an
//!    SLM model (k = 0.6, excess loss) scored by a selector process running the reference.
//!    Both evaluate on the held-out set as they train. With `--ablations`, three more target
//!    runs from the same start on the same stream with the same k: ranked by reference loss
//!    alone, by the model's own loss, and a random k% (the control).
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
use rho_trainer::ScoreRule;

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
    let stages = if plan.ablations { 10 } else { 7 };
    let stage = |n: usize, what: &str| eprintln!("[{n}/{stages}] {what}");

    // 1. Corpora.
    let data = corpus::data_dir(&out);
    let sets = [
        ("curated", plan.curated_docs, 0.0, plan.easy, 1u64),
        ("train", plan.train_docs, plan.noise, plan.easy, 2),
        ("heldout", plan.heldout_docs, 0.0, 0.0, 3),
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
    for (name, docs, noise, easy, salt) in sets {
        let shards = if docs >= 2000 { 4 } else { 1 };
        let a = SynthArgs {
            out: data.join(name),
            shards,
            docs_per_shard: docs.div_ceil(shards),
            noise,
            easy,
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
            Rule::None,
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
        .run("causal", &train_paths, &target_init, plan.steps, Rule::None)
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
            Rule::Excess(&reference_model),
        )
        .await?;

    // 7. to 9. The ablations: the other score rules, same start, stream, budget and k.
    let mut ablations = Vec::new();
    if plan.ablations {
        let rules = [
            (
                Rule::Reference(&reference_model),
                "ranked by reference loss alone, scored by a selector process",
            ),
            (
                Rule::Current,
                "ranked by the model's own loss (no reference)",
            ),
            (Rule::Random, "a random k% of each batch (no reference)"),
        ];
        for (i, (rule, what)) in rules.into_iter().enumerate() {
            let name = rule.score().name();
            stage(
                7 + i,
                &format!(
                    "ablation `{name}` (k = {}): {} steps {what} (`rho run`)",
                    plan.ratio, plan.steps
                ),
            );
            let run = pipes
                .run(
                    &format!("ablation-{name}"),
                    &train_paths,
                    &target_init,
                    plan.steps,
                    rule,
                )
                .await?;
            ablations.push((rule.score(), run));
        }
    }

    // The report.
    stage(stages, "writing the report");
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
        ablations: ablations.iter().map(|(r, o)| (*r, o)).collect(),
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

/// The selection of a target run, with the reference model where the rule needs one.
#[derive(Clone, Copy)]
enum Rule<'a> {
    /// Every token: causal LM.
    None,
    /// SLM: the top k by excess loss.
    Excess(&'a Path),
    /// The top k by reference loss alone.
    Reference(&'a Path),
    /// The top k by the model's own loss.
    Current,
    /// A random k.
    Random,
}

impl<'a> Rule<'a> {
    fn score(self) -> ScoreRule {
        match self {
            Rule::None => ScoreRule::None,
            Rule::Excess(_) => ScoreRule::Excess,
            Rule::Reference(_) => ScoreRule::Reference,
            Rule::Current => ScoreRule::Current,
            Rule::Random => ScoreRule::Random,
        }
    }

    fn reference(self) -> Option<&'a Path> {
        match self {
            Rule::Excess(r) | Rule::Reference(r) => Some(r),
            _ => None,
        }
    }
}

/// Micro-batches of every training step of the demo (its batches have 8 or 16 rows).
const MICRO_BATCHES: usize = 2;

/// What the demo's pipelines share.
struct Pipelines<'a> {
    out: &'a Path,
    plan: &'a Plan,
    seed: u64,
    tokenizer: &'a Path,
    heldout_loader: &'a Path,
}

impl Pipelines<'_> {
    /// Writes a run config and runs it with `rho run`, its progress on this terminal: causal LM,
    /// or selection by `rule` with a selector process when the rule needs the reference.
    async fn run(
        &self,
        name: &str,
        data: &[String],
        init: &Path,
        steps: u64,
        rule: Rule<'_>,
    ) -> anyhow::Result<RunOutcome> {
        let reference = rule.reference();
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
        let selection = match rule {
            Rule::None => json!({"score": "none"}),
            _ => json!({"score": rule.score(), "scope": "batch", "seed": seed,
                          "schedule": {"kind": "constant", "ratio": plan.ratio}}),
        };
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        // The trainer has every core, its two micro-batches side by side (one lane each on two
        // cores); a selector takes half the cores beside it (its forward pass is a third of a
        // training step's work; times in docs/BENCHMARKS.md, "The demo"). The micro-batch count
        // is fixed and the lanes do not change any bit, so the numbers are the same on any
        // machine.
        let selector = reference.map(|r| {
            json!({
                "model": r,
                "tokenizer": tokenizer,
                "threads": (cores / 2).max(1),
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
                "threads": cores,
                "micro_batches": MICRO_BATCHES,
            },
        });
        crate::supervise::launch(&dir, name, &config).await
    }
}
