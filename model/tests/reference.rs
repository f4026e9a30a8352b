//! Per-token losses against HuggingFace `transformers` (PyTorch, f32, eager attention) on the
//! committed fixtures: Llama (the shared tiny-llama checkpoint), Mistral with a sliding window
//! shorter than the sequence, Qwen2 with q/k/v biases and tied embeddings, a Llama with Llama 3
//! RoPE scaling and tied embeddings, and Qwen3 with its per-head q/k norms, tied embeddings and
//! a head width other than `hidden_size / num_attention_heads` (`fixtures/make_fixtures.py`
//! made the last four).

use std::path::{Path as FsPath, PathBuf};

use candle_core::{DType, Device, Tensor};
use rho_model::{checkpoint, per_token_loss, ForwardMode};

fn fixture(name: &str) -> PathBuf {
    FsPath::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Reference {
    ids: Vec<Vec<u32>>,
    losses: Vec<Vec<f32>>,
}

fn reference(dir: &FsPath) -> Reference {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ref_losses.json")).unwrap())
            .unwrap();
    let rows = |k: &str| -> Vec<Vec<serde_json::Value>> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().clone())
            .collect()
    };
    Reference {
        ids: rows("input_ids")
            .into_iter()
            .map(|r| r.iter().map(|x| x.as_u64().unwrap() as u32).collect())
            .collect(),
        losses: rows("per_token_loss")
            .into_iter()
            .map(|r| r.iter().map(|x| x.as_f64().unwrap() as f32).collect())
            .collect(),
    }
}

fn check(name: &str) {
    let dir = fixture(name);
    let r = reference(&dir);
    let model = checkpoint::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let (b, w) = (r.ids.len(), r.ids[0].len());
    let ids = Tensor::from_vec(r.ids.concat(), (b, w), &Device::Cpu).unwrap();
    for path in [ForwardMode::Fused, ForwardMode::Differentiable] {
        for chunk in [None, Some(1), Some(7)] {
            let got = per_token_loss(&model, &ids, path, chunk)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let mut worst = 0f32;
            for (g, e) in got.iter().flatten().zip(r.losses.iter().flatten()) {
                worst = worst.max((g - e).abs());
            }
            eprintln!("{name} {path:?} chunk {chunk:?}: max abs error {worst:e}");
            assert!(
                worst < 1e-4,
                "{name} {path:?} chunk {chunk:?}: max abs error {worst}"
            );
        }
    }
}

#[test]
fn tiny_llama_matches_transformers() {
    check("tiny-llama");
}

#[test]
fn tiny_mistral_sliding_window_matches_transformers() {
    check("tiny-mistral");
}

#[test]
fn tiny_qwen2_matches_transformers() {
    check("tiny-qwen2");
}

#[test]
fn tiny_qwen3_matches_transformers() {
    check("tiny-qwen3");
}

#[test]
fn checkpoints_round_trip_single_and_sharded() {
    let src = fixture("tiny-llama");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let tensors = checkpoint::read_tensors(&src, &Device::Cpu).unwrap();
    let ids = Tensor::from_vec(reference(&src).ids.concat(), (2, 40), &Device::Cpu).unwrap();
    let base = per_token_loss(
        &checkpoint::load(&src, &Device::Cpu, DType::F32).unwrap(),
        &ids,
        ForwardMode::Fused,
        None,
    )
    .unwrap()
    .to_vec2::<f32>()
    .unwrap();
    for shard in [None, Some(100_000)] {
        let dir = tempfile::tempdir().unwrap();
        checkpoint::save(dir.path(), &config, &tensors, shard).unwrap();
        let files = checkpoint::weight_files(dir.path()).unwrap();
        assert_eq!(files.len() > 1, shard.is_some(), "{files:?}");
        let back = checkpoint::read_tensors(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(back.len(), tensors.len());
        let model = checkpoint::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
        let again = per_token_loss(&model, &ids, ForwardMode::Fused, None)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(again, base);
    }
}

#[test]
fn bad_inputs_are_named() {
    let dir = fixture("tiny-llama");
    let model = checkpoint::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let ids = Tensor::from_vec(vec![1u32, 2, 9999], (1, 3), &Device::Cpu).unwrap();
    let e = per_token_loss(&model, &ids, ForwardMode::Fused, None).unwrap_err();
    assert!(e.to_string().contains("9999"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    let e = checkpoint::load(empty.path(), &Device::Cpu, DType::F32).unwrap_err();
    assert!(e.to_string().contains("config.json"), "{e}");
}

#[test]
fn tiny_llama3_rope_scaling_matches_transformers() {
    check("tiny-llama3-rope");
}

/// A document longer than a window is scored in overlapping windows: every token but the first
/// once; with a window as long as the document, the losses are those of one row.
#[test]
fn document_losses_cover_every_token_once() {
    let dir = fixture("tiny-llama");
    let r = reference(&dir);
    let model = checkpoint::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let ids: Vec<u32> = r.ids.concat();
    let n = ids.len();
    let whole = rho_model::loss::document_losses(&model, &ids, n - 1).unwrap();
    let row = Tensor::from_vec(ids.clone(), (1, n), &Device::Cpu).unwrap();
    let direct = per_token_loss(&model, &row, ForwardMode::Fused, None)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(whole, direct[0]);
    for seq_len in [1, 3, 5] {
        let pieces = rho_model::loss::document_losses(&model, &ids, seq_len).unwrap();
        assert_eq!(pieces.len(), n - 1, "seq_len {seq_len}");
        // The first window sees the same context as the whole row.
        for (a, b) in pieces[..seq_len].iter().zip(&whole[..seq_len]) {
            assert!((a - b).abs() < 1e-5, "seq_len {seq_len}: {a} vs {b}");
        }
        assert!(pieces.iter().all(|l| l.is_finite() && *l > 0.0));
    }
    assert!(rho_model::loss::document_losses(&model, &ids[..1], 4)
        .unwrap()
        .is_empty());
}

/// The per-token losses `transformers` computes in float16 with eager attention
/// (`ref_losses_f16.json`, written by `fixtures/make_half_losses.py`), and how far its own SDPA
/// kernel's float16 losses are from them.
struct HalfReference {
    losses: Vec<Vec<f32>>,
    sdpa_max_abs_diff: f32,
    sdpa_mean_abs_diff: f32,
}

fn half_reference(dir: &FsPath) -> HalfReference {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ref_losses_f16.json")).unwrap())
            .unwrap();
    let number = |k: &str| v[k].as_f64().unwrap() as f32;
    HalfReference {
        losses: v["per_token_loss"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let row = r.as_array().unwrap();
                row.iter().map(|x| x.as_f64().unwrap() as f32).collect()
            })
            .collect(),
        sdpa_max_abs_diff: number("sdpa_max_abs_diff"),
        sdpa_mean_abs_diff: number("sdpa_mean_abs_diff"),
    }
}

/// Largest and mean absolute difference of two equally shaped sets of rows.
fn distance(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    let pairs: Vec<f32> = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .collect();
    assert_eq!(pairs.len(), a.iter().map(Vec::len).sum::<usize>());
    let max = pairs.iter().copied().fold(0f32, f32::max);
    (max, pairs.iter().sum::<f32>() / pairs.len() as f32)
}

/// Weights loaded in f16, activations in f16 on the CPU, softmax, norms and losses in f32.
///
/// The tolerance: two correct float16 implementations do not agree to f32 precision, because
/// they sum matmuls in other orders and round elementwise results at other points (candle's CPU
/// SiLU and RoPE round each operation to f16). How far apart they land is measured on each
/// fixture by `transformers` itself: its SDPA and eager kernels in float16 differ by 1.0e-3 to
/// 2.1e-3 at most (2.8e-4 to 5.5e-4 on average) on losses near 6, about one f16 rounding of
/// the loss (6 * 2^-11 = 2.9e-3). rho's f16 losses must be within twice that distance of the
/// eager ones, per fixture, at most and on average; and they must differ from rho's own f32
/// losses, so that a path that quietly ran in f32 would not pass.
fn check_half(name: &str) {
    let dir = fixture(name);
    let r = reference(&dir);
    let half = half_reference(&dir);
    let (b, w) = (r.ids.len(), r.ids[0].len());
    let ids = Tensor::from_vec(r.ids.concat(), (b, w), &Device::Cpu).unwrap();
    let f32_model = checkpoint::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let model = checkpoint::load(&dir, &Device::Cpu, DType::F16).unwrap();
    for path in [ForwardMode::Fused, ForwardMode::Differentiable] {
        let got = per_token_loss(&model, &ids, path, None).unwrap();
        assert_eq!(got.dtype(), DType::F32, "losses come back in f32");
        let got = got.to_vec2::<f32>().unwrap();
        let (max, mean) = distance(&got, &half.losses);
        let own_f32 = per_token_loss(&f32_model, &ids, path, None)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let (_, moved) = distance(&got, &own_f32);
        eprintln!(
            "{name} f16 {path:?}: against transformers f16 max {max:.2e} mean {mean:.2e} \
             (its SDPA vs eager: max {:.2e} mean {:.2e}); against rho f32: mean {moved:.2e}",
            half.sdpa_max_abs_diff, half.sdpa_mean_abs_diff
        );
        assert!(
            max <= 2.0 * half.sdpa_max_abs_diff,
            "{name} {path:?}: max {max}"
        );
        assert!(
            mean <= 2.0 * half.sdpa_mean_abs_diff,
            "{name} {path:?}: mean {mean}"
        );
        assert!(
            moved > 1e-5,
            "{name} {path:?}: the f16 model computed in f32"
        );
    }
}

#[test]
fn half_precision_matches_transformers_f16() {
    for name in [
        "tiny-llama",
        "tiny-mistral",
        "tiny-qwen2",
        "tiny-llama3-rope",
        "tiny-qwen3",
    ] {
        check_half(name);
    }
}
