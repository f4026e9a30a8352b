//! The CPU paths that the workspace's candle-core patch changed (vendor/candle-core/PATCH.md),
//! against element-by-element references: matmul outputs allocated without a zero fill,
//! elementwise maps and strided copies on the rayon pool, the tiled transpose, products split
//! over the threads of the pool they run in. Sizes straddle
//! the thresholds where the parallel paths start, layouts include offsets, batches and
//! broadcasts.

use candle_core::{DType, Device, IndexOp, Tensor};

/// Deterministic values in [-1, 1) with no two neighbours alike.
fn values(n: usize, seed: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let x = (i.wrapping_mul(2654435761).wrapping_add(seed * 97)) % 10007;
            x as f32 / 5003.5 - 1.0
        })
        .collect()
}

fn tensor(dims: &[usize], seed: u64) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(values(n, seed), dims, &Device::Cpu).unwrap()
}

/// Every element of `t` by walking its shape index by index (`i` over the flat row-major index).
fn by_index(t: &Tensor) -> Vec<f32> {
    let dims = t.dims().to_vec();
    let n: usize = dims.iter().product();
    (0..n)
        .map(|mut i| {
            let mut idx = vec![0usize; dims.len()];
            for k in (0..dims.len()).rev() {
                idx[k] = i % dims[k];
                i /= dims[k];
            }
            let mut e = t.clone();
            for &j in &idx {
                e = e.i(j).unwrap();
            }
            e.to_scalar::<f32>().unwrap()
        })
        .collect()
}

/// The same `[b, r, c]` values stored with each matrix's columns contiguous.
fn stored_transposed(t: &Tensor) -> Tensor {
    t.transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(1, 2)
        .unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn transposed_copies_match_an_index_walk() {
    // Small enough to index element by element, large enough (65,536+ elements) to take the
    // tiled parallel path; odd sizes so that tiles are cut at the edges.
    for (dims, narrow) in [
        (vec![257usize, 263], None),
        (vec![3, 129, 181], None),
        (vec![2, 3, 97, 131], None),
        (vec![300, 271], Some(5usize)),
        (vec![40, 30], None),
    ] {
        let mut t = tensor(&dims, 1);
        if let Some(start) = narrow {
            // A view with an offset into its storage.
            let d0 = t.dim(0).unwrap();
            t = t.narrow(0, start, d0 - start).unwrap();
        }
        let rank = t.rank();
        let view = t.transpose(rank - 2, rank - 1).unwrap();
        let copied = view.contiguous().unwrap();
        assert!(copied.is_contiguous());
        let n = view.elem_count();
        if n <= 20_000 {
            assert_eq!(flat(&copied), by_index(&view), "{dims:?}");
        }
        // The copy transposed back is the original, exactly.
        let back = copied
            .transpose(rank - 2, rank - 1)
            .unwrap()
            .contiguous()
            .unwrap();
        assert_eq!(flat(&back), flat(&t), "{dims:?}");
        // Against the same transpose done by hand.
        let (r, c) = (t.dims()[rank - 2], t.dims()[rank - 1]);
        let src = flat(&t);
        let batches = n / (r * c);
        let mut expected = vec![0f32; n];
        for b in 0..batches {
            for i in 0..c {
                for j in 0..r {
                    expected[b * r * c + i * r + j] = src[b * r * c + j * c + i];
                }
            }
        }
        assert_eq!(flat(&copied), expected, "{dims:?}");
    }
}

#[test]
fn head_transposes_match_a_hand_permutation() {
    // `[b, t, h, d]` to `[b, h, t, d]` and back, as attention does: blocks of `d` elements.
    let (b, t, h, d) = (2, 300, 6, 64);
    let x = tensor(&[b, t, h, d], 2);
    let y = x.transpose(1, 2).unwrap().contiguous().unwrap();
    let src = flat(&x);
    let got = flat(&y);
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                for di in 0..d {
                    assert_eq!(
                        got[((bi * h + hi) * t + ti) * d + di],
                        src[((bi * t + ti) * h + hi) * d + di]
                    );
                }
            }
        }
    }
    let back = y.transpose(1, 2).unwrap().contiguous().unwrap();
    assert_eq!(flat(&back), src);
}

#[test]
fn large_elementwise_maps_match_the_scalar_functions() {
    for n in [
        1000usize,
        (1 << 16) - 1,
        1 << 16,
        (1 << 16) + 12345,
        300_001,
    ] {
        let a = tensor(&[n], 3);
        let b = tensor(&[n], 4);
        let (va, vb) = (flat(&a), flat(&b));
        let check = |got: Tensor, f: &dyn Fn(usize) -> f32, what: &str| {
            let got = flat(&got);
            for (i, g) in got.iter().enumerate() {
                assert_eq!(g.to_bits(), f(i).to_bits(), "{what} at {i} of {n}");
            }
        };
        check((&a + &b).unwrap(), &|i| va[i] + vb[i], "add");
        check((&a * &b).unwrap(), &|i| va[i] * vb[i], "mul");
        check((&a - &b).unwrap(), &|i| va[i] - vb[i], "sub");
        check((&a / &b).unwrap(), &|i| va[i] / vb[i], "div");
        check((&a * 0.3).unwrap(), &|i| va[i] * 0.3f32 + 0.0, "affine");
        check(a.sqr().unwrap(), &|i| va[i] * va[i], "sqr");
        check(
            a.abs().unwrap().sqrt().unwrap(),
            &|i| va[i].abs().sqrt(),
            "sqrt",
        );
        // A view with an offset (contiguous, one block).
        let tail = a.narrow(0, 7, n - 7).unwrap();
        check(
            (&tail + &b.narrow(0, 0, n - 7).unwrap()).unwrap(),
            &|i| va[i + 7] + vb[i],
            "add with offsets",
        );
        // Conversions go through the same map.
        let half = a
            .to_dtype(DType::F64)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(flat(&half), va);
    }
}

/// `a [.., m, k] x b [.., k, n]` by the definition, in f64.
fn matmul_by_hand(a: &[f32], b: &[f32], batches: usize, m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0f64; batches * m * n];
    for bi in 0..batches {
        for i in 0..m {
            for j in 0..n {
                out[(bi * m + i) * n + j] = (0..k)
                    .map(|l| {
                        f64::from(a[(bi * m + i) * k + l]) * f64::from(b[(bi * k + l) * n + j])
                    })
                    .sum();
            }
        }
    }
    out
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}: element {i} is {g}");
        assert!(
            (f64::from(*g) - w).abs() <= 1e-4 * (1.0 + w.abs()),
            "{what}: element {i}: {g} against {w}"
        );
    }
}

#[test]
fn matmul_writes_every_output_element() {
    // Fresh allocations of the same size in a row: a stale or unwritten element would show as
    // a wrong value (the allocator hands back the previous, non-zero, buffer).
    for round in 0..3 {
        // Plain, batched, batched with a transposed right operand, broadcast right operand.
        let (bs, m, k, n) = (3, 33, 47, 29);
        let a = tensor(&[bs, m, k], 5 + round);
        let b = tensor(&[bs, k, n], 6 + round);
        let want = matmul_by_hand(&flat(&a), &flat(&b), bs, m, k, n);
        assert_close(&flat(&a.matmul(&b).unwrap()), &want, "batched");
        let bt = stored_transposed(&b);
        assert_close(&flat(&a.matmul(&bt).unwrap()), &want, "transposed rhs");
        let w = tensor(&[k, n], 7 + round);
        let wb = w.broadcast_as((bs, k, n)).unwrap();
        let wv = flat(&w);
        let want_b = matmul_by_hand(&flat(&a), &wv.repeat(bs), bs, m, k, n);
        assert_close(
            &flat(&a.broadcast_matmul(&w).unwrap()),
            &want_b,
            "broadcast rhs",
        );
        assert_close(
            &flat(&a.matmul(&wb).unwrap()),
            &want_b,
            "broadcast rhs view",
        );
        // The same left operand stored with its columns contiguous, times a broadcast right one
        // (candle 0.9.2 flattened the view case into one product as if the rows were evenly
        // spaced: wrong results, fixed by the patch).
        let at = stored_transposed(&a);
        assert_close(
            &flat(&at.broadcast_matmul(&w).unwrap()),
            &want_b,
            "transposed lhs, broadcast rhs",
        );
        assert_close(
            &flat(&at.matmul(&wb).unwrap()),
            &want_b,
            "transposed lhs, broadcast rhs view",
        );
        // A broadcast left operand, several rows and one (candle 0.9.2 flattened it into one
        // wide product with the wrong strides: wrong results, fixed by the patch).
        let l = tensor(&[m, k], 8 + round);
        let lb = l.broadcast_as((bs, m, k)).unwrap();
        let want_l = matmul_by_hand(&flat(&l).repeat(bs), &flat(&b), bs, m, k, n);
        assert_close(&flat(&lb.matmul(&b).unwrap()), &want_l, "broadcast lhs");
        let row = tensor(&[1, k], 9 + round);
        let want_r = matmul_by_hand(&flat(&row).repeat(bs), &flat(&b), bs, 1, k, n);
        let rb = row.broadcast_as((bs, 1, k)).unwrap();
        assert_close(&flat(&rb.matmul(&b).unwrap()), &want_r, "broadcast row");
        // k = 0: all zeros.
        let e1 = Tensor::zeros((m, 0), DType::F32, &Device::Cpu).unwrap();
        let e2 = Tensor::zeros((0, n), DType::F32, &Device::Cpu).unwrap();
        let z = e1.matmul(&e2).unwrap();
        assert_eq!(z.dims(), &[m, n]);
        assert!(flat(&z).iter().all(|v| *v == 0.0), "k = 0 gives zeros");
    }
}

#[test]
fn a_batch_of_products_gives_the_bits_of_each_product_alone() {
    // A batched product (attention's heads) and its products one at a time: the same bits
    // (a plain and a transposed right operand).
    let (bs, m, k, n) = (6, 128, 64, 96);
    let a = tensor(&[bs, m, k], 11);
    let b = tensor(&[bs, k, n], 12);
    let bt = stored_transposed(&b);
    for (rhs, what) in [(&b, "plain"), (&bt, "transposed")] {
        let batched = flat(&a.matmul(rhs).unwrap());
        let mut one_by_one = Vec::new();
        for i in 0..bs {
            let p = a.i(i).unwrap().matmul(&rhs.i(i).unwrap()).unwrap();
            one_by_one.extend(flat(&p));
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&batched), bits(&one_by_one), "{what}");
    }
}

#[test]
fn products_split_over_the_current_pool_with_the_same_bits() {
    // candle's matmul splits a product over the threads of the rayon pool it runs in (the
    // patched `get_num_threads`): a pool of one thread multiplies alone, and every pool gives
    // the same bits (a selector's lanes depend on it). The shapes are a 20m layer's, large
    // enough that `gemm` splits them.
    let x = tensor(&[1024, 384], 21);
    let w = tensor(&[1024, 384], 22);
    let h = tensor(&[1024, 1024], 23);
    let bits = |t: Tensor| flat(&t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let products = || {
        (
            rayon::current_num_threads(),
            candle_core::utils::get_num_threads(),
            bits(x.matmul(&w.t().unwrap()).unwrap()),
            bits(h.matmul(&w).unwrap()),
            bits(h.t().unwrap().matmul(&x).unwrap()),
        )
    };
    let mut results = Vec::new();
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let (seen, used, a, b, c) = pool.install(products);
        assert_eq!((seen, used), (threads, threads), "the pool's threads");
        results.push((a, b, c));
    }
    for (i, r) in results.iter().enumerate().skip(1) {
        assert!(r.0 == results[0].0, "x w^T: {} threads", i + 1);
        assert!(r.1 == results[0].1, "h w: {} threads", i + 1);
        assert!(r.2 == results[0].2, "h^T x: {} threads", i + 1);
    }
}
