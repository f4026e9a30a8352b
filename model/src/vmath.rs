//! Vectorized f32 math for the fused CPU kernels: `exp`, reductions, and the loops built on
//! them.
//!
//! Every function here gives the same bits on every x86-64 CPU and on every other target: the
//! arithmetic is plain IEEE `+ - * /` (never fused into FMA), with a fixed order of operations
//! (the reductions keep [`LANES`] partial results, combined in a fixed order), so the only thing
//! that changes with the CPU is how many lanes run at once. Each public kernel is compiled
//! three times, for AVX-512, for AVX2 and for the target's baseline, and picks the widest one
//! the CPU has at run time.
//! With the environment variable `RHO_VMATH_BASELINE` set, every kernel runs its baseline
//! version (for checking that the bits agree; it is read once per process).

/// Partial results kept by the reductions ([`sum`], [`dot`], [`max`]): 16 f32, one AVX-512
/// register.
pub const LANES: usize = 16;

/// `e^x` to within 2 ulp for normal results: `+inf` above `ln(f32::MAX)`, `0` below
/// `ln(f32::MIN_POSITIVE)` (where the true value is subnormal, under `1.2e-38`), NaN for NaN.
///
/// Range reduction `x = n ln 2 + r` with `|r| <= ln 2 / 2` (Cody-Waite, two constants), then the
/// degree-7 polynomial of Cephes' `expf` for `e^r` and a scale by `2^n` (as two factors, so that
/// `n = 128` does not overflow the exponent field). Branch-free, so loops over it vectorize.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const HI: f32 = 88.722_83; // ln(f32::MAX), rounded down
    const LO: f32 = -87.336_54; // ln(f32::MIN_POSITIVE), rounded up
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    const C1: f32 = 0.693_359_4; // ln 2 = C1 + C2, C1 with few mantissa bits: n * C1 is exact
    const C2: f32 = -2.121_944_4e-4;
    let xc = x.clamp(LO, HI); // NaN stays NaN
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * C1 - n * C2;
    let mut p = 1.987_569_2e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let p = p * (r * r) + r + 1.0;
    // The integer n sits in the low mantissa bits of t.
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let n1 = ni >> 1;
    let n2 = ni.wrapping_sub(n1);
    let s1 = f32::from_bits((n1.wrapping_add(127) as u32).wrapping_shl(23));
    let s2 = f32::from_bits((n2.wrapping_add(127) as u32).wrapping_shl(23));
    let y = p * s1 * s2;
    if x > HI {
        f32::INFINITY
    } else if x < LO {
        0.0
    } else {
        y
    }
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// One public kernel, compiled for AVX-512, AVX2 and the baseline, chosen at run time.
macro_rules! kernel {
    ($(#[$m:meta])* pub fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        // The target-feature variants are `unsafe` to call; each call is guarded below.
        #[allow(unsafe_code)]
        pub fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn imp($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($a: $t),*) $(-> $r)? {
                    imp($($a),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($a: $t),*) $(-> $r)? {
                    imp($($a),*)
                }
                match level() {
                    // SAFETY: `level` saw the CPU support the function's target features.
                    Level::Avx512 => return unsafe { avx512($($a),*) },
                    Level::Avx2 => return unsafe { avx2($($a),*) },
                    Level::Base => {}
                }
            }
            imp($($a),*)
        }
    };
}

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Level {
    Avx512,
    Avx2,
    Base,
}

#[cfg(target_arch = "x86_64")]
fn level() -> Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        if std::env::var_os("RHO_VMATH_BASELINE").is_some() {
            Level::Base
        } else if is_x86_feature_detected!("avx512f") {
            Level::Avx512
        } else if is_x86_feature_detected!("avx2") {
            Level::Avx2
        } else {
            Level::Base
        }
    })
}

/// Combines [`LANES`] partial results and a tail in a fixed order.
#[inline(always)]
fn fold(acc: [f32; LANES], tail: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut a = acc;
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            a[l] = f(a[l], a[l + w]);
        }
        w /= 2;
    }
    f(a[0], tail)
}

kernel! {
    /// The sum of `x`, in [`LANES`] partial sums (lane `l` adds `x[l], x[l + 16], ...`),
    /// combined pairwise; the tail that does not fill a row of lanes is added last, in order.
    pub fn sum(x: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let chunks = x.chunks_exact(LANES);
        let tail = chunks.remainder().iter().fold(0f32, |s, &v| s + v);
        for c in chunks {
            for l in 0..LANES {
                acc[l] += c[l];
            }
        }
        fold(acc, tail, |a, b| a + b)
    }
}

kernel! {
    /// `sum(a[i] * b[i])` over the shorter of the two, in the order of [`sum`].
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let mut acc = [0f32; LANES];
        let full = n / LANES * LANES;
        let tail = (full..n).fold(0f32, |s, i| s + a[i] * b[i]);
        for (ca, cb) in a[..full].chunks_exact(LANES).zip(b[..full].chunks_exact(LANES)) {
            for l in 0..LANES {
                acc[l] += ca[l] * cb[l];
            }
        }
        fold(acc, tail, |a, b| a + b)
    }
}

kernel! {
    /// The largest element of `x` (NaNs ignored, as `f32::max` does); `-inf` when empty.
    pub fn max(x: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let chunks = x.chunks_exact(LANES);
        let tail = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for c in chunks {
            for l in 0..LANES {
                acc[l] = acc[l].max(c[l]);
            }
        }
        fold(acc, tail, f32::max)
    }
}

kernel! {
    /// `dst[i] = e^(src[i] - shift)` over the shorter of the two.
    pub fn exp_shifted(dst: &mut [f32], src: &[f32], shift: f32) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = exp(s - shift);
        }
    }
}

kernel! {
    /// `x[i] = e^(x[i] - shift)`.
    pub fn exp_shifted_in_place(x: &mut [f32], shift: f32) {
        for v in x.iter_mut() {
            *v = exp(*v - shift);
        }
    }
}

/// `x = softmax(x)`: `e^(x - max(x))` over its [`sum`].
pub fn softmax_in_place(x: &mut [f32]) {
    exp_shifted_in_place(x, max(x));
    scale(x, 1.0 / sum(x));
}

kernel! {
    /// `x[i] *= s`.
    pub fn scale(x: &mut [f32], s: f32) {
        for v in x.iter_mut() {
            *v *= s;
        }
    }
}

kernel! {
    /// SwiGLU forward: `out[i] = gate[i] * sigmoid(gate[i]) * up[i]`.
    pub fn swiglu(out: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g * sigmoid(g) * u;
        }
    }
}

kernel! {
    /// SwiGLU backward, with `s = sigmoid(gate)`: `d_up = grad * gate * s` and
    /// `d_gate = grad * up * s * (1 + gate * (1 - s))`.
    pub fn swiglu_backward(
        d_gate: &mut [f32],
        d_up: &mut [f32],
        gate: &[f32],
        up: &[f32],
        grad: &[f32],
    ) {
        let n = d_gate.len().min(d_up.len()).min(gate.len()).min(up.len()).min(grad.len());
        let (d_gate, d_up) = (&mut d_gate[..n], &mut d_up[..n]);
        let (gate, up, grad) = (&gate[..n], &up[..n], &grad[..n]);
        for i in 0..n {
            let (g, s) = (gate[i], sigmoid(gate[i]));
            d_up[i] = grad[i] * g * s;
            d_gate[i] = grad[i] * up[i] * s * (1.0 + g * (1.0 - s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite f32 of the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_over_its_normal_range() {
        let mut worst = (0u32, 0f32);
        let (lo, hi) = (-87.3f32, 88.7f32);
        let n = 2_000_000;
        for i in 0..=n {
            let x = lo + (hi - lo) * (i as f32 / n as f32);
            let want = (x as f64).exp() as f32;
            let d = ulps(exp(x), want);
            if d > worst.0 {
                worst = (d, x);
            }
        }
        // One f32 in every 64 of [-1, 1], where softmax's shifted inputs and sigmoid's land most.
        for bits in (0..1.0f32.to_bits()).step_by(64) {
            for x in [f32::from_bits(bits), -f32::from_bits(bits)] {
                let d = ulps(exp(x), (x as f64).exp() as f32);
                if d > worst.0 {
                    worst = (d, x);
                }
            }
        }
        assert!(worst.0 <= 2, "{} ulp at x = {}", worst.0, worst.1);
    }

    #[test]
    fn exp_at_its_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        let top = exp(88.72);
        assert!(top.is_finite() && ulps(top, (88.72f32 as f64).exp() as f32) <= 2);
        let bottom = exp(-87.33);
        assert!(bottom >= f32::MIN_POSITIVE && ulps(bottom, (-87.33f32 as f64).exp() as f32) <= 2);
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 20.0 - 10.0
            })
            .collect()
    }

    #[test]
    fn reductions_match_their_definitions() {
        for n in [0, 1, 15, 16, 17, 100, 512, 8195] {
            let x = values(n, n as u32);
            let y = values(n, n as u32 + 7);
            let s64: f64 = x.iter().map(|&v| v as f64).sum();
            let d64: f64 = x.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
            let bound = |terms: f64| 1e-6 * terms.max(1.0) * n.max(1) as f64;
            let abs: f64 = x.iter().map(|&v| v.abs() as f64).sum();
            assert!((sum(&x) as f64 - s64).abs() <= bound(abs), "sum of {n}");
            let dabs: f64 = x.iter().zip(&y).map(|(&a, &b)| (a * b).abs() as f64).sum();
            assert!(
                (dot(&x, &y) as f64 - d64).abs() <= bound(dabs),
                "dot of {n}"
            );
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&x), m, "max of {n}");
        }
        assert_eq!(max(&[f32::NAN, 1.0, f32::NAN]), 1.0);
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        // The kernels as compiled for the baseline, against the dispatched ones.
        let x = values(8195, 3);
        let y = values(8195, 4);
        let mut a = vec![0f32; x.len()];
        exp_shifted(&mut a, &x, 1.5);
        let b: Vec<f32> = x.iter().map(|&v| exp(v - 1.5)).collect();
        assert_eq!(a, b);
        let (mut dg, mut du) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        swiglu_backward(&mut dg, &mut du, &x, &y, &a);
        for i in 0..x.len() {
            let s = 1.0 / (1.0 + exp(-x[i]));
            assert_eq!(du[i].to_bits(), (a[i] * x[i] * s).to_bits());
            let want = a[i] * y[i] * s * (1.0 + x[i] * (1.0 - s));
            assert_eq!(dg[i].to_bits(), want.to_bits());
        }
        let mut o = vec![0f32; x.len()];
        swiglu(&mut o, &x, &y);
        for i in 0..x.len() {
            assert_eq!(o[i].to_bits(), (x[i] * sigmoid(x[i]) * y[i]).to_bits());
        }
    }
}
