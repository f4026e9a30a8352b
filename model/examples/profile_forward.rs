//! Where the time of a forward goes: `cargo run --release -p rho-model --example profile_forward -- DIR`
//! (a checkpoint directory, such as `ref-20m` written by `rho bench selector`): the fused heads op
//! against its composition in one process, the elementwise kernels and the attention op alone,
//! then the forward with the CPU time it used (cores busy, spinning included).
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn cpu_secs() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ut: f64 = f[11].parse().unwrap();
    let st: f64 = f[12].parse().unwrap();
    (ut + st) / 100.0
}

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).expect("checkpoint dir");
    let model = rho_model::checkpoint::load(std::path::Path::new(&dir), &Device::Cpu, DType::F32)?;
    let v = model.config().vocab_size;
    let ids: Vec<u32> = (0..4 * 513).map(|i| ((i * 7919) % v) as u32).collect();
    let ids = Tensor::from_vec(ids, (4, 513), &Device::Cpu)?;
    let inputs = ids.narrow(1, 0, 512)?.contiguous()?;
    let _ = rho_model::per_token_loss(&model, &ids, rho_model::ForwardMode::Fused, None)?;
    heads_ab(model.config())?;
    elementwise()?;
    attention_op()?;
    for _ in 0..3 {
        let (t, c) = (Instant::now(), cpu_secs());
        for _ in 0..5 {
            let _ = model.hidden(&inputs, rho_model::ForwardMode::Fused)?;
        }
        let (w, c) = (t.elapsed().as_secs_f64() / 5.0, (cpu_secs() - c) / 5.0);
        let (t, c2) = (Instant::now(), cpu_secs());
        for _ in 0..5 {
            let _ = rho_model::per_token_loss(&model, &ids, rho_model::ForwardMode::Fused, None)?;
        }
        let (w2, c2) = (t.elapsed().as_secs_f64() / 5.0, (cpu_secs() - c2) / 5.0);
        println!(
            "hidden {:.1} ms wall, {:.2} cpus; full loss {:.1} ms wall, {:.2} cpus, {:.0} tokens/s",
            w * 1e3,
            c / w,
            w2 * 1e3,
            c2 / w2,
            2048.0 / w2
        );
    }
    Ok(())
}

fn heads_ab(cfg: &rho_model::Config) -> anyhow::Result<()> {
    let (b, t, n, d) = (4, 512, 6, 64);
    let x = Tensor::randn(0f32, 1., (b * t, n * d), &Device::Cpu)?;
    let (cos, sin) = rho_model::rope::tables(cfg, t, &Device::Cpu, DType::F32)?;
    let tables = rho_model::fused::RopeTables::new(&cos, &sin)?.unwrap();
    let (mut a, mut c) = (0.0, 0.0);
    for _ in 0..20 {
        let s = Instant::now();
        for _ in 0..8 {
            let q = x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?;
            let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
            let _q = (q * 0.125)?;
            let k = x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?;
            let _k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
            let _v = x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?;
        }
        a += s.elapsed().as_secs_f64();
        let s = Instant::now();
        for _ in 0..8 {
            let _q = rho_model::fused::heads(&x, (b, t, n, d), Some(&tables), Some(0.125))?;
            let _k = rho_model::fused::heads(&x, (b, t, n, d), Some(&tables), None)?;
            let _v = rho_model::fused::heads(&x, (b, t, n, d), None, None)?;
        }
        c += s.elapsed().as_secs_f64();
    }
    println!(
        "8 layers of q, k, v heads: composition {:.1} ms, fused {:.1} ms",
        a / 20.0 * 1e3,
        c / 20.0 * 1e3
    );
    Ok(())
}

fn elementwise() -> anyhow::Result<()> {
    let g = Tensor::randn(0f32, 1., (2048, 1024), &Device::Cpu)?;
    let u = Tensor::randn(0f32, 1., (2048, 1024), &Device::Cpu)?;
    let x = Tensor::randn(0f32, 1., (2048, 384), &Device::Cpu)?;
    let w = Tensor::ones(384, DType::F32, &Device::Cpu)?;
    let time = |name: &str, f: &dyn Fn() -> anyhow::Result<Tensor>| -> anyhow::Result<()> {
        println!("{name}: {:.3} ms", mean_ms(f)?);
        Ok(())
    };
    time("swiglu 2048x1024", &|| {
        Ok(rho_model::fused::swiglu(&g, &u)?.unwrap())
    })?;
    time("rms_norm 2048x384", &|| {
        Ok(rho_model::fused::rms_norm(&x, &w, 1e-5)?.unwrap())
    })?;
    time("add 2048x384", &|| Ok((&x + &x)?))?;
    time("copy 2048x1024", &|| Ok(g.copy()?))?;
    Ok(())
}

fn attention_op() -> anyhow::Result<()> {
    let q = Tensor::randn(0f32, 1., (4, 6, 512, 64), &Device::Cpu)?;
    let k = Tensor::randn(0f32, 1., (4, 6, 512, 64), &Device::Cpu)?;
    let v = Tensor::randn(0f32, 1., (4, 6, 512, 64), &Device::Cpu)?;
    let ms = mean_ms(&|| {
        rho_model::attention::causal_attention(&q, &k, &v, None)?
            .ok_or_else(|| anyhow::anyhow!("the fused attention op does not apply"))
    })?;
    let flops = 4.0 * 6.0 * 2.0 * 2.0 * 64.0 * (512.0 * 513.0 / 2.0);
    println!(
        "causal attention op 4x6x512x64: {ms:.3} ms ({:.1} GFLOP/s of visible products)",
        flops / ms / 1e6
    );
    Ok(())
}

/// Mean wall time of `f` in milliseconds over 40 calls, after one warm-up call.
fn mean_ms(f: &dyn Fn() -> anyhow::Result<Tensor>) -> anyhow::Result<f64> {
    f()?;
    let t = Instant::now();
    for _ in 0..40 {
        f()?;
    }
    Ok(t.elapsed().as_secs_f64() / 40.0 * 1e3)
}
