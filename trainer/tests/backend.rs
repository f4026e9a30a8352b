//! The candle backend: gradients against finite differences, every parameter trained, and a
//! resumed run bit-identical to an uninterrupted one.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rho_model::HfConfig;
use rho_protocol::{Fingerprint, TokenBatch};
use rho_trainer::optim::OptimizerConfig;
use rho_trainer::{Backend, CandleBackend, RatioSchedule, Scope, ScoreRule, Selection, StepInput};

fn tiny_config(tie: bool) -> serde_json::Value {
    serde_json::json!({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": tie
    })
}

/// A tiny Qwen3: per-head q/k norms, a head width other than hidden / heads, tied embeddings.
fn tiny_qwen3() -> serde_json::Value {
    let mut c = tiny_config(true);
    c["model_type"] = "qwen3".into();
    c["head_dim"] = 12.into();
    c
}

/// Random weights, scaled up so that gradients are large enough for f32 finite differences.
fn weights(config: &serde_json::Value, scale: f64) -> HashMap<String, Tensor> {
    let c = HfConfig::from_json(&config.to_string())
        .unwrap()
        .into_config()
        .unwrap();
    rho_model::init::random_weights(&c, 7, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let t = if t.rank() == 2 {
                (t * scale).unwrap()
            } else {
                t
            };
            (n, t)
        })
        .collect()
}

fn batch(seq: u64, rows: usize, window: usize) -> TokenBatch {
    let tokens = (0..rows * window)
        .map(|i| ((i as u64 * 31 + seq * 17 + i as u64 * i as u64) % 64) as u32)
        .collect();
    let mut lengths = vec![window as u32; rows];
    lengths[rows - 1] = (window - 3) as u32; // one padded row
    TokenBatch {
        run_id: "t".into(),
        seq,
        epoch: 0,
        rows,
        window,
        tokenizer: Fingerprint::of_bytes(b"t"),
        tokens,
        lengths,
        doc_starts: vec![vec![0]; rows],
        stream: None,
        rank: None,
    }
}

fn input(seq: u64) -> StepInput {
    let b = batch(seq, 3, 10);
    let n = b.rows * (b.window - 1);
    let ref_loss = (0..n)
        .map(|i| ((i * 7 + seq as usize) % 11) as f32 * 0.5)
        .collect();
    StepInput {
        batch: b,
        ref_loss: Some(ref_loss),
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn gradients_agree_with_finite_differences() {
    for cfg in [tiny_config(false), tiny_config(true), tiny_qwen3()] {
        let backend = CandleBackend::new(
            cfg.clone(),
            weights(&cfg, 25.0),
            &Device::Cpu,
            OptimizerConfig::default(),
        )
        .unwrap();
        let b = batch(0, 2, 9);
        let ids = Tensor::from_slice(&b.tokens, (2, 9), &Device::Cpu).unwrap();
        let mask: Vec<f32> = (0..16)
            .map(|i| if i % 3 == 0 { 0.0 } else { 1.0 })
            .collect();
        let denom = mask.iter().sum::<f32>();
        let (_, grads) = backend.gradients(&ids, &mask, denom).unwrap();
        let (mut analytic, mut numeric) = (Vec::new(), Vec::new());
        for ((name, var), g) in backend.vars().iter().zip(&grads) {
            let base = flat(var.as_tensor());
            let g = flat(g);
            for &i in &[0, base.len() / 3, base.len() - 1] {
                let eps = 1e-2f32;
                let objective = |delta: f32| {
                    let mut p = base.clone();
                    p[i] += delta;
                    var.set(&Tensor::from_vec(p, var.as_tensor().dims(), &Device::Cpu).unwrap())
                        .unwrap();
                    backend.gradients(&ids, &mask, denom).unwrap().0
                };
                let fd = (objective(eps) - objective(-eps)) / (2.0 * eps);
                var.set(
                    &Tensor::from_vec(base.clone(), var.as_tensor().dims(), &Device::Cpu).unwrap(),
                )
                .unwrap();
                assert!(
                    (fd - g[i]).abs() <= 2e-2 * fd.abs().max(g[i].abs()) + 2e-3,
                    "{name}[{i}]: finite difference {fd}, gradient {}",
                    g[i]
                );
                analytic.push(f64::from(g[i]));
                numeric.push(f64::from(fd));
            }
        }
        let dot: f64 = analytic.iter().zip(&numeric).map(|(a, b)| a * b).sum();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let cosine = dot / (norm(&analytic) * norm(&numeric));
        assert!(cosine > 0.999, "cosine {cosine}");
    }
}

#[test]
fn every_parameter_receives_a_gradient_and_moves() {
    for cfg in [tiny_config(false), tiny_qwen3()] {
        every_parameter_of(cfg);
    }
}

fn every_parameter_of(cfg: serde_json::Value) {
    let mut backend = CandleBackend::new(
        cfg.clone(),
        weights(&cfg, 1.0),
        &Device::Cpu,
        OptimizerConfig::default(),
    )
    .unwrap();
    let b = batch(0, 3, 10);
    let ids = Tensor::from_slice(&b.tokens, (3, 10), &Device::Cpu).unwrap();
    let (_, grads) = backend.gradients(&ids, &[1.0; 27], 27.0).unwrap();
    for ((name, _), g) in backend.vars().iter().zip(&grads) {
        let norm: f32 = flat(g).iter().map(|x| x.abs()).sum();
        assert!(norm > 0.0, "`{name}` received no gradient");
    }
    let before = backend.weights().unwrap();
    let sel = Selection::default();
    let stats = backend.step(0, &input(0), &sel).unwrap();
    let after = backend.weights().unwrap();
    for (name, t) in &before {
        assert_ne!(flat(t), flat(&after[name]), "`{name}` did not move");
    }
    // Selection of 0.6 of the valid positions: rows of 9, 9 and 6 targets (the last row has 7
    // real tokens), 24 in all; round(0.6 * 24) = 14.
    assert_eq!(stats.tokens, 24);
    assert!(
        (stats.selected_fraction - 14.0 / 24.0).abs() < 1e-6,
        "{}",
        stats.selected_fraction
    );
    assert!(stats.loss_selected.is_finite() && stats.loss_all > 0.0 && stats.grad_norm > 0.0);
}

fn run(backend: &mut CandleBackend, steps: std::ops::Range<u64>, sel: &Selection) {
    for s in steps {
        backend.step(s, &input(s), sel).unwrap();
    }
}

#[test]
fn a_resumed_run_ends_bit_identical() {
    let cfg = tiny_config(true);
    let optim = OptimizerConfig {
        lr: 1e-2,
        warmup_steps: 2,
        decay_steps: Some(8),
        ..Default::default()
    };
    let sel = Selection {
        score: ScoreRule::Excess,
        scope: Scope::Batch,
        schedule: RatioSchedule::CausalThen {
            steps: 2,
            ratio: 0.6,
        },
        seed: 0,
        ..Selection::default()
    };
    let mut straight =
        CandleBackend::new(cfg.clone(), weights(&cfg, 1.0), &Device::Cpu, optim).unwrap();
    run(&mut straight, 0..8, &sel);

    let mut first =
        CandleBackend::new(cfg.clone(), weights(&cfg, 1.0), &Device::Cpu, optim).unwrap();
    run(&mut first, 0..3, &sel);
    let dir = tempfile::tempdir().unwrap();
    first.save(dir.path()).unwrap();
    drop(first);
    let mut resumed =
        CandleBackend::from_checkpoint(&dir.path().join("model"), &Device::Cpu, optim).unwrap();
    resumed.load(dir.path()).unwrap();
    run(&mut resumed, 3..8, &sel);

    let (a, b) = (straight.weights().unwrap(), resumed.weights().unwrap());
    for (name, t) in &a {
        let (x, y) = (flat(t), flat(&b[name]));
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "`{name}` differs after resuming"
        );
    }
}

#[test]
fn micro_batches_select_over_the_whole_step() {
    let cfg = tiny_config(false);
    let sel = Selection::default();
    let mut one = CandleBackend::new(
        cfg.clone(),
        weights(&cfg, 1.0),
        &Device::Cpu,
        OptimizerConfig::default(),
    )
    .unwrap();
    let mut three = CandleBackend::new(
        cfg.clone(),
        weights(&cfg, 1.0),
        &Device::Cpu,
        OptimizerConfig::default(),
    )
    .unwrap()
    .split(
        std::num::NonZeroUsize::new(3),
        std::num::NonZeroUsize::new(1),
    )
    .unwrap();
    let a = one.step(0, &input(0), &sel).unwrap();
    let b = three.step(0, &input(0), &sel).unwrap();
    assert_eq!(a.selected_fraction, b.selected_fraction);
    assert!((a.loss_selected - b.loss_selected).abs() < 1e-5);
    assert!(
        (a.grad_norm - b.grad_norm).abs() < 1e-4 * a.grad_norm.max(1.0),
        "{} vs {}",
        a.grad_norm,
        b.grad_norm
    );
    let (wa, wb) = (one.weights().unwrap(), three.weights().unwrap());
    for (name, t) in &wa {
        let d = flat(t)
            .iter()
            .zip(flat(&wb[name]))
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            d < 1e-5,
            "`{name}` differs by {d} between 1 and 3 micro-batches"
        );
    }
}

#[test]
fn micro_batches_in_lanes_give_the_bits_of_one_lane() {
    // Two lanes run the micro-batches side by side, each on its own thread, keeping their
    // graphs; one lane runs them one after another, recomputing each forward pass under its
    // backward pass. Same losses, same gradients, same weights, to the bit.
    let cfg = tiny_config(false);
    let sel = Selection::default();
    // Made on two threads, whatever this machine's cores: the lanes split the current pool's.
    let two_threads = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let make = |lanes| {
        two_threads.install(|| {
            CandleBackend::new(
                cfg.clone(),
                weights(&cfg, 1.0),
                &Device::Cpu,
                OptimizerConfig::default(),
            )
            .unwrap()
            .split(
                std::num::NonZeroUsize::new(3),
                std::num::NonZeroUsize::new(lanes),
            )
            .unwrap()
        })
    };
    let (mut one, mut two) = (make(1), make(2));
    assert_eq!((one.lanes(), two.lanes()), (1, 2));
    for step in 0..2 {
        let a = one.step(step, &input(step), &sel).unwrap();
        let b = two.step(step, &input(step), &sel).unwrap();
        assert_eq!(a.loss_selected.to_bits(), b.loss_selected.to_bits());
        assert_eq!(a.grad_norm.to_bits(), b.grad_norm.to_bits());
        assert_eq!(a.selected_fraction, b.selected_fraction);
    }
    let (wa, wb) = (one.weights().unwrap(), two.weights().unwrap());
    for (name, t) in &wa {
        let same = flat(t)
            .iter()
            .zip(flat(&wb[name]))
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "`{name}` differs between one and two lanes");
    }
}
