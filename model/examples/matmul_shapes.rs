//! The matmul shapes of a `20m` training step (4 x 512 tokens), timed one by one:
//! `cargo run --release -p rho-model --example matmul_shapes` (`-- 512 1376 32000 8` for the
//! 60M model); `bench/torch_matmul.py` times the
//! same products in PyTorch.
use candle_core::{Device, Tensor};
use std::time::Instant;
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn t(name: &str, f: &dyn Fn() -> candle_core::Result<Tensor>, flops: f64) -> anyhow::Result<()> {
    f()?;
    f()?;
    let n = 10;
    let s = Instant::now();
    for _ in 0..n {
        f()?;
    }
    let e = s.elapsed().as_secs_f64() / n as f64;
    println!("{name}: {:.1} GFLOP/s ({:.2} ms)", flops / e / 1e9, e * 1e3);
    Ok(())
}
fn main() -> anyhow::Result<()> {
    let c = Device::Cpu;
    // `20m` by default; `-- 512 1376 32000 8` gives the 60M model's (hidden, MLP, vocabulary, heads).
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let (d, ff, v, heads) = match args[..] {
        [] => (384, 1024, 8192, 6),
        [d, ff, v, heads] => (d, ff, v, heads),
        _ => anyhow::bail!("arguments: hidden MLP vocabulary heads (or none, for `20m`)"),
    };
    let n = 2048usize;
    let r = |a: usize, b: usize| Tensor::randn(0f32, 1., (a, b), &c);
    let (x, w, wq, h, wd, wl, dy, dyl) = (
        r(n, d)?,
        r(ff, d)?,
        r(d, d)?,
        r(n, ff)?,
        r(d, ff)?,
        r(v, d)?,
        r(n, ff)?,
        r(n, v)?,
    );
    let f = |a: usize, b: usize, k: usize| 2.0 * (a * b * k) as f64;
    t("x@wq.T", &|| x.matmul(&wq.t()?), f(n, d, d))?;
    t("x@w.T (gate)", &|| x.matmul(&w.t()?), f(n, d, ff))?;
    t("h@wd.T (down)", &|| h.matmul(&wd.t()?), f(n, d, ff))?;
    t("x@wl.T (lm)", &|| x.matmul(&wl.t()?), f(n, d, v))?;
    t("dy@w (dx gate)", &|| dy.matmul(&w), f(n, d, ff))?;
    t("dy.T@x (dW gate)", &|| dy.t()?.matmul(&x), f(n, d, ff))?;
    t("dyl@wl (dx lm)", &|| dyl.matmul(&wl), f(n, d, v))?;
    t("dyl.T@x (dW lm)", &|| dyl.t()?.matmul(&x), f(n, d, v))?;
    let bh = 4 * heads;
    let q = Tensor::randn(0f32, 1., (bh, 512, 64), &c)?;
    let k = Tensor::randn(0f32, 1., (bh, 512, 64), &c)?;
    let p = Tensor::randn(0f32, 1., (bh, 512, 512), &c)?;
    t("q@k.T", &|| q.matmul(&k.t()?), f(bh * 512, 512, 64))?;
    t("p@v", &|| p.matmul(&k), f(bh * 512, 512, 64))?;
    Ok(())
}
