//! Where the time of a forward goes: `cargo run --release -p rho-model --example profile_forward -- DIR`.
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).expect("checkpoint dir");
    let model = rho_model::checkpoint::load(std::path::Path::new(&dir), &Device::Cpu, DType::F32)?;
    let v = model.config().vocab_size;
    let ids: Vec<u32> = (0..4 * 513).map(|i| ((i * 7919) % v) as u32).collect();
    let ids = Tensor::from_vec(ids, (4, 513), &Device::Cpu)?;
    let inputs = ids.narrow(1, 0, 512)?.contiguous()?;
    for _ in 0..2 {
        let t = Instant::now();
        let h = model.hidden(&inputs, rho_model::ForwardMode::Fused)?;
        let th = t.elapsed();
        let t = Instant::now();
        let h2 = h.reshape((2048, h.dim(2)?))?;
        let logits = h2.matmul(&model.lm_head().t()?)?;
        let tl = t.elapsed();
        let t = Instant::now();
        let _ = rho_model::per_token_loss(&model, &ids, rho_model::ForwardMode::Fused, None)?;
        let tt = t.elapsed();
        println!(
            "hidden {th:?}, lm_head matmul {tl:?} ({:?}), full loss {tt:?}",
            logits.dims()
        );
    }
    attention_parts()?;
    let a = Tensor::randn(0f32, 1., (2048, 384), &Device::Cpu)?;
    let w = Tensor::randn(0f32, 1., (1024, 384), &Device::Cpu)?;
    let t = Instant::now();
    for _ in 0..10 {
        let _ = a.matmul(&w.t()?)?;
    }
    let e = t.elapsed().as_secs_f64() / 10.0;
    println!(
        "matmul 2048x384 @ 384x1024 (w.t()): {:.1} GFLOP/s",
        2.0 * 2048.0 * 384.0 * 1024.0 / e / 1e9
    );
    let wt = w.t()?.contiguous()?;
    let t = Instant::now();
    for _ in 0..10 {
        let _ = a.matmul(&wt)?;
    }
    let e = t.elapsed().as_secs_f64() / 10.0;
    println!(
        "matmul 2048x384 @ 384x1024 (contiguous): {:.1} GFLOP/s",
        2.0 * 2048.0 * 384.0 * 1024.0 / e / 1e9
    );
    Ok(())
}

#[allow(dead_code)]
fn attention_parts() -> anyhow::Result<()> {
    let q = Tensor::randn(0f32, 1., (4, 6, 512, 64), &Device::Cpu)?;
    let k = Tensor::randn(0f32, 1., (4, 6, 512, 64), &Device::Cpu)?;
    let mask = Tensor::zeros((512, 512), DType::F32, &Device::Cpu)?;
    let time =
        |name: &str, f: &dyn Fn() -> candle_core::Result<Tensor>| -> anyhow::Result<Tensor> {
            let t = Instant::now();
            let mut r = f()?;
            for _ in 0..4 {
                r = f()?;
            }
            println!("{name}: {:?}", t.elapsed() / 5);
            Ok(r)
        };
    let s = time("q @ k^T", &|| q.matmul(&k.t()?))?;
    let s2 = time("k^T contiguous then matmul", &|| {
        q.matmul(&k.t()?.contiguous()?)
    })?;
    let _ = s2;
    time("scale", &|| &s * 0.125)?;
    time("mask add", &|| s.broadcast_add(&mask))?;
    let p = time("softmax_last_dim", &|| candle_nn::ops::softmax_last_dim(&s))?;
    time("p @ v", &|| p.matmul(&k))?;
    time("transpose+contiguous", &|| q.transpose(1, 2)?.contiguous())?;
    Ok(())
}
