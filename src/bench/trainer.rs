//! `rho bench trainer`: what token selection costs a training step.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use rho_protocol::{Fingerprint, TokenBatch};
use rho_trainer::optim::OptimizerConfig;
use rho_trainer::{Backend, CandleBackend, RatioSchedule, Scope, ScoreRule, Selection, StepInput};

use crate::commands::model as model_cmd;

/// The vocabulary of the benchmark's model unless `--vocab-size` says otherwise.
pub const DEFAULT_VOCAB: usize = 8192;

pub fn run(
    out: PathBuf,
    preset: String,
    (seq_len, batch_size): (usize, usize),
    steps: u64,
    vocab: usize,
    (micro_batches, lanes): (Option<NonZeroUsize>, Option<NonZeroUsize>),
) -> anyhow::Result<()> {
    let dir = out.join(match vocab {
        DEFAULT_VOCAB => format!("model-{preset}"),
        v => format!("model-{preset}-v{v}"),
    });
    if !dir.join("model.safetensors").exists() {
        model_cmd::init_checkpoint(
            &dir,
            &model_cmd::preset_config(&preset, vocab, seq_len.max(512))?,
            3,
        )?;
    }
    let input = |seq: u64| step_input(batch_size, seq_len, vocab, seq);
    let optim = OptimizerConfig {
        lr: 1e-4,
        ..Default::default()
    };
    let causal = Selection {
        score: ScoreRule::None,
        scope: Scope::Batch,
        schedule: RatioSchedule::Constant { ratio: 1.0 },
        seed: 0,
        ..Selection::default()
    };
    let slm = Selection {
        score: ScoreRule::Excess,
        scope: Scope::Batch,
        schedule: RatioSchedule::Constant { ratio: 0.6 },
        seed: 0,
        ..Selection::default()
    };
    // As the trainer resolves them, on every core.
    let threads = rayon::current_num_threads();
    let mut backend =
        CandleBackend::from_checkpoint(&dir, &Device::Cpu, optim)?.split(micro_batches, lanes)?;
    let micro = backend.micro_batches().min(batch_size);
    let lanes = backend.lanes().min(micro);
    let params: usize = backend
        .vars()
        .iter()
        .map(|(_, v)| v.as_tensor().elem_count())
        .sum();
    println!("model `{preset}`: {:.1}M parameters; batches of {batch_size} x {seq_len} tokens; AdamW; candle CPU f32; {micro} micro-batch{} in {lanes} lane{} on {threads} threads", params as f64 / 1e6, if micro == 1 { "" } else { "es" }, if lanes == 1 { "" } else { "s" });
    backend.step(0, &input(0), &slm)?; // warm-up
    let (mut t_causal, mut t_slm) = (0f64, 0f64);
    let mut step = 1;
    for round in 0..4 {
        // Alternate which mode goes first, so that neither always follows the other.
        let mut modes = [(&causal, &mut t_causal), (&slm, &mut t_slm)];
        if round % 2 == 1 {
            modes.reverse();
        }
        for (sel, acc) in modes {
            let t0 = Instant::now();
            for _ in 0..steps {
                backend.step(step, &input(step), sel)?;
                step += 1;
            }
            *acc += t0.elapsed().as_secs_f64();
        }
    }
    let n = (4 * steps) as f64;
    let tokens = (batch_size * seq_len) as f64;
    let select_ms = selection_ms(batch_size, seq_len);
    println!("| mode | seconds/step | tokens/s | vs causal |");
    println!("|---|---|---|---|");
    println!(
        "| causal LM (every token) | {:.3} | {:.0} | 1.000x |",
        t_causal / n,
        tokens * n / t_causal
    );
    println!(
        "| SLM, excess loss, k = 0.6 | {:.3} | {:.0} | {:.3}x |",
        t_slm / n,
        tokens * n / t_slm,
        t_causal / t_slm
    );
    println!("selection alone (score, sort, mask of {} positions): {select_ms:.3} ms = {:.2}% of an SLM step", batch_size * seq_len, select_ms / 1e3 / (t_slm / n) * 100.0);
    Ok(())
}

/// Milliseconds of the selection alone (score, sort, mask) of SLM's top 60% by excess loss over
/// `rows x seq_len` positions of made-up losses, the mean of 100.
fn selection_ms(rows: usize, seq_len: usize) -> f64 {
    let current: Vec<f32> = (0..rows * seq_len)
        .map(|i| ((i * 13) % 101) as f32 / 7.0)
        .collect();
    let reference: Vec<f32> = (0..rows * seq_len)
        .map(|i| ((i * 37) % 97) as f32 / 10.0)
        .collect();
    let valid = vec![true; current.len()];
    let t0 = Instant::now();
    for _ in 0..100 {
        std::hint::black_box(rho_trainer::selection::select(
            ScoreRule::Excess,
            Scope::Batch,
            0.6,
            &rho_trainer::selection::Losses {
                rows,
                len: seq_len,
                current: &current,
                reference: Some(&reference),
                valid: &valid,
            },
        ));
    }
    t0.elapsed().as_secs_f64() / 100.0 * 1e3
}

/// A training step's input of `rows x seq_len` tokens (a fixed pattern that varies with `seq`)
/// and made-up reference losses.
pub(super) fn step_input(rows: usize, seq_len: usize, vocab: usize, seq: u64) -> StepInput {
    let window = seq_len + 1;
    let tokens = (0..rows * window)
        .map(|i| ((i as u64 * 7919 + seq * 104_729) % vocab as u64) as u32)
        .collect();
    let n = rows * seq_len;
    StepInput {
        batch: TokenBatch {
            run_id: "bench".into(),
            seq,
            epoch: 0,
            rows,
            window,
            tokenizer: Fingerprint::of_bytes(b"bench"),
            tokens,
            lengths: vec![window as u32; rows],
            doc_starts: vec![vec![0]; rows],
            stream: None,
            rank: None,
        },
        ref_loss: Some((0..n).map(|i| ((i * 37) % 97) as f32 / 10.0).collect()),
    }
}
