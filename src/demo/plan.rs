//! The sizes of a demo: the command line, and the plan it makes.

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Clone)]
pub struct DemoArgs {
    /// Run directory (data, tokenizer, models, the three runs, the report).
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Seed of the corpora, the initializations and the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A small, fast variant (under two minutes), for tests.
    #[arg(long)]
    pub quick: bool,
    /// Train the target models on these shards (files, directories or globs of parquet or
    /// jsonl with a `text` field) instead of the synthetic noisy corpus.
    #[arg(long)]
    pub data: Option<String>,
    /// Training steps of each target model (overrides the preset).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Training steps of the reference model (overrides the preset).
    #[arg(long)]
    pub reference_steps: Option<u64>,
    /// The share of tokens SLM trains on.
    #[arg(long, default_value_t = 0.6)]
    pub ratio: f64,
    /// Also train with the other score rules, from the same initialization on the same stream
    /// with the same k: reference loss alone, the model's own loss, and a random k%.
    #[arg(long)]
    pub ablations: bool,
}

/// The sizes of a demo.
#[derive(Debug, Clone)]
pub struct Plan {
    pub preset: &'static str,
    pub vocab: usize,
    pub seq_len: usize,
    pub batch: usize,
    pub reference_steps: u64,
    pub steps: u64,
    pub eval_every: u64,
    pub eval_batches: usize,
    pub lr: f64,
    pub curated_docs: usize,
    pub train_docs: usize,
    pub heldout_docs: usize,
    pub noise: f64,
    /// Chance that a paragraph of the curated and training sets that is not noise is easy
    /// (learned at once); the held-out set has none: it measures what is hard but learnable.
    pub easy: f64,
    pub ratio: f64,
    pub quick: bool,
    pub ablations: bool,
}

impl Plan {
    pub fn quick(&self) -> bool {
        self.quick
    }

    pub fn new(args: &DemoArgs) -> Plan {
        let mut plan = if args.quick {
            Plan {
                preset: "tiny",
                vocab: 512,
                seq_len: 64,
                batch: 8,
                reference_steps: 60,
                steps: 60,
                eval_every: 3,
                eval_batches: 2,
                lr: 3e-3,
                curated_docs: 300,
                train_docs: 800,
                heldout_docs: 60,
                noise: 0.35,
                easy: 0.5,
                ratio: args.ratio,
                quick: args.quick,
                ablations: args.ablations,
            }
        } else {
            Plan {
                preset: "small",
                vocab: 2048,
                seq_len: 128,
                batch: 16,
                reference_steps: 500,
                steps: 600,
                eval_every: 30,
                eval_batches: 8,
                lr: 2e-3,
                curated_docs: 3000,
                train_docs: 10_000,
                heldout_docs: 400,
                noise: 0.35,
                easy: 0.5,
                ratio: args.ratio,
                quick: args.quick,
                ablations: args.ablations,
            }
        };
        if let Some(s) = args.steps {
            plan.steps = s.max(1);
            plan.eval_every = (plan.steps / 20).max(1);
        }
        if let Some(s) = args.reference_steps {
            plan.reference_steps = s.max(1);
        }
        plan
    }

    /// Tokens each target model reads: steps x rows x positions.
    pub fn tokens_per_run(&self) -> u64 {
        self.steps * (self.batch * self.seq_len) as u64
    }
}
