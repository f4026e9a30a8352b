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

use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::json;

pub mod plan;
pub mod report;

use crate::commands::model as model_cmd;
use crate::supervise::RunOutcome;
use crate::synth::{self as corpus, SynthArgs};
use rho_protocol::Endpoint;
use rho_selector::SelectorConfig;
use rho_trainer::ScoreRule;

pub use plan::DemoArgs;
use plan::Plan;

/// Runs the demo: corpora, tokenizer, models, the pipelines of every run, the report.
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

    let synth = write_corpora(&args, &plan, &out, &stage)?;
    let train_paths = match &args.data {
        Some(d) => vec![absolute(d)?],
        None => vec![synth[1].out.to_string_lossy().into_owned()],
    };
    let curated = synth[0].out.to_string_lossy().into_owned();
    let (tokenizer, vocab) = train_tokenizer(&plan, &out, &train_paths, &curated, &stage)?;
    let (reference_init, target_init) = init_models(&args, &plan, &out, vocab, &stage)?;
    let heldout_loader = out.join("heldout-loader.json");
    write_heldout_loader(&plan, &synth[2].out, &tokenizer, &heldout_loader)?;
    let pipes = Pipelines {
        out: &out,
        plan: &plan,
        seed: args.seed,
        tokenizer: &tokenizer,
        heldout_loader: &heldout_loader,
    };
    let starts = Starts {
        curated: &curated,
        train: &train_paths,
        reference: &reference_init,
        target: &target_init,
    };
    let trained = train_every_model(&pipes, &starts, &stage).await?;

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
        reference_model: &trained.reference_model,
        slm_model: &final_model(&trained.slm)?,
        runs: [&trained.reference, &trained.causal, &trained.slm],
        ablations: trained.ablations.iter().map(|(r, o)| (*r, o)).collect(),
        sample_docs: sample_docs.as_deref(),
        started,
    };
    let report = report::write(&inputs)?;
    println!("{}", report::summary_text(&report, &out));
    Ok(())
}

/// Prints the progress line of stage `n` of the demo.
type Stage<'a> = &'a dyn Fn(usize, &str);

/// Stage 1: the three corpora (curated clean, noisy training, held-out clean) from disjoint
/// seeds, in that order.
fn write_corpora(
    args: &DemoArgs,
    plan: &Plan,
    out: &Path,
    stage: Stage,
) -> anyhow::Result<Vec<SynthArgs>> {
    let data = corpus::data_dir(out);
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
    Ok(synth)
}

/// Stage 2: a byte-level BPE tokenizer trained on the training and curated corpora; (its file,
/// its vocabulary size).
fn train_tokenizer(
    plan: &Plan,
    out: &Path,
    train_paths: &[String],
    curated: &str,
    stage: Stage,
) -> anyhow::Result<(PathBuf, usize)> {
    let tokenizer = out.join("tokenizer.json");
    stage(
        2,
        &format!(
            "training a byte-level BPE tokenizer of {} tokens: {}",
            plan.vocab,
            tokenizer.display()
        ),
    );
    let mut paths = train_paths.to_vec();
    paths.push(curated.to_owned());
    let trained = rho_loader::train::train_bpe(
        &rho_loader::DataConfig::new(paths),
        plan.vocab,
        Some(20_000),
        &tokenizer,
    )?;
    Ok((tokenizer, trained.vocab_size))
}

/// Stage 3: initial weights, one for the reference and one shared by every target model;
/// (reference, target) checkpoint directories.
fn init_models(
    args: &DemoArgs,
    plan: &Plan,
    out: &Path,
    vocab: usize,
    stage: Stage,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    stage(
        3,
        &format!("initializing `{}` models (vocabulary {vocab})", plan.preset),
    );
    let models = out.join("models");
    let config = model_cmd::preset_config(plan.preset, vocab, plan.seq_len + 1)?;
    let reference_init = models.join("reference-init");
    let target_init = models.join("target-init");
    model_cmd::init_checkpoint(&reference_init, &config, args.seed.wrapping_add(101))?;
    model_cmd::init_checkpoint(&target_init, &config, args.seed.wrapping_add(202))?;
    Ok((reference_init, target_init))
}

/// The loader config of the held-out set every run evaluates on, in its unshuffled order.
fn write_heldout_loader(
    plan: &Plan,
    heldout: &Path,
    tokenizer: &Path,
    file: &Path,
) -> anyhow::Result<()> {
    let heldout = vec![heldout.to_string_lossy().into_owned()];
    let mut config = crate::runtime::loader_config(heldout, tokenizer, plan.seq_len, plan.batch)?;
    config.run_id = "demo-heldout".into();
    config.shuffle_window = NonZeroUsize::MIN;
    std::fs::write(file, serde_json::to_string_pretty(&config)?)
        .with_context(|| format!("writing {}", file.display()))
}

/// Where the demo's models start and what they train on.
struct Starts<'a> {
    /// The curated set the reference trains on.
    curated: &'a str,
    /// The noisy corpus every target model trains on.
    train: &'a [String],
    /// The reference's initial checkpoint.
    reference: &'a Path,
    /// The initial checkpoint every target model starts from.
    target: &'a Path,
}

/// What the demo's runs trained.
struct Trained {
    reference: RunOutcome,
    reference_model: PathBuf,
    causal: RunOutcome,
    slm: RunOutcome,
    /// The ablations' runs by score rule (none without `--ablations`).
    ablations: Vec<(ScoreRule, RunOutcome)>,
}

/// Stages 4 to 9: the reference (causal LM on the curated set), then from one start, on one
/// stream, with one budget: the causal-LM baseline, SLM, and the ablations when asked for.
async fn train_every_model(
    pipes: &Pipelines<'_>,
    starts: &Starts<'_>,
    stage: Stage<'_>,
) -> anyhow::Result<Trained> {
    let plan = pipes.plan;
    stage(
        4,
        &format!(
            "training the reference model: {} steps of causal LM on the curated set (`rho run`)",
            plan.reference_steps
        ),
    );
    let curated = [starts.curated.to_owned()];
    let (steps, train, target) = (plan.steps, starts.train, starts.target);
    let reference = pipes
        .run(
            "reference",
            &curated,
            starts.reference,
            plan.reference_steps,
            Rule::None,
        )
        .await?;
    let reference_model = final_model(&reference)?;
    stage(
        5,
        &format!("training the causal-LM baseline: {steps} steps on the noisy corpus (`rho run`)"),
    );
    let causal = pipes
        .run("causal", train, target, steps, Rule::None)
        .await?;
    stage(
        6,
        &format!(
            "training with SLM (k = {}): {steps} steps on the same stream, scored by a selector process (`rho run`)",
            plan.ratio
        ),
    );
    let slm = pipes
        .run("slm", train, target, steps, Rule::Excess(&reference_model))
        .await?;
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
                    "ablation `{name}` (k = {}): {steps} steps {what} (`rho run`)",
                    plan.ratio
                ),
            );
            let run = pipes
                .run(&format!("ablation-{name}"), train, target, steps, rule)
                .await?;
            ablations.push((rule.score(), run));
        }
    }
    Ok(Trained {
        reference,
        reference_model,
        causal,
        slm,
        ablations,
    })
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
            let mut selector = SelectorConfig::new(r.to_path_buf(), tokenizer.to_path_buf());
            selector.threads = Some((cores / 2).max(1));
            selector
        });
        let mut loader =
            crate::runtime::loader_config(data.to_vec(), tokenizer, plan.seq_len, plan.batch)?;
        loader.run_id = format!("demo-{name}-{seed}");
        loader.seed = seed;
        loader.epochs = NonZeroU32::new(1000).context("epochs")?;
        loader.threads = 1;
        // Unassigned: `rho run` binds it on a free loopback port.
        loader.endpoint = Endpoint::default();
        let config = json!({
            "run_dir": ".",
            "selector": selector,
            "selectors": 1,
            "loader": loader,
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
