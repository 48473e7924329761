//! Finite-difference gradient checks of every CPU kernel (float32, 5-point stencil; the
//! tolerance is documented on `common::check_gradient`).

mod common;

use common::{check_gradient, randn};
use handgrad::backend::cpu::attention::{attention_backward, attention_forward};
use handgrad::backend::cpu::embedding::{embedding_backward, embedding_forward};
use handgrad::backend::cpu::linear::{
    linear_backward_input, linear_backward_weight, linear_forward,
};
use handgrad::backend::cpu::loss::{cross_entropy_forward_backward, cross_entropy_loss};
use handgrad::backend::cpu::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use handgrad::backend::cpu::rope::{rope_backward, rope_forward};
use handgrad::backend::cpu::swiglu::{swiglu_backward, swiglu_forward};
use handgrad::backend::{
    AttentionShape, LinearShape, NormSaved, Positions, Qkv, QkvGrads, RopeStyle, RopeTable,
};

fn qkv<'a>(q: &'a [f32], k: &'a [f32], v: &'a [f32]) -> Qkv<'a> {
    Qkv { q, k, v }
}

fn grads<'a>(dq: &'a mut [f32], dk: &'a mut [f32], dv: &'a mut [f32]) -> QkvGrads<'a> {
    QkvGrads { dq, dk, dv }
}

/// `sum(r * y)` in f64: the scalar whose gradient with respect to `y` is `r`.
fn project(y: &[f32], r: &[f32]) -> f64 {
    y.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
}

fn assert_ok(report: common::GradReport) {
    assert!(report.checked > 0);
    assert!(
        report.failures.is_empty(),
        "{} of {} gradient entries wrong (worst ratio {:.2}):\n{}",
        report.failures.len(),
        report.checked,
        report.worst,
        report.failures.join("\n")
    );
}

fn all(n: usize) -> Vec<usize> {
    (0..n).collect()
}

#[test]
fn rmsnorm_gradients_with_random_gains() {
    for (rows, d) in [(3, 7), (4, 16), (2, 1)] {
        let x = randn(rows * d, 1, 0.3, 1.0);
        let w = randn(d, 2, 1.0, 0.5); // gains far from 1: this caught the original's bug
        let r = randn(rows * d, 3, 0.0, 1.0);
        let eps = 1e-5;
        let mut dx = vec![0.0; rows * d];
        let mut dw = vec![0.0; d];
        let mut out = vec![0.0; rows * d];
        let mut rstd = vec![0.0; rows];
        rmsnorm_forward(&mut out, &mut rstd, &x, &w, d, eps);
        let saved = NormSaved {
            x: &x,
            w: &w,
            rstd: &rstd,
        };
        rmsnorm_backward(&mut dx, &mut dw, &r, saved, d, false);
        let mut packed = [x.clone(), w.clone()].concat();
        let analytic = [dx.clone(), dw.clone()].concat();
        let mut loss = |p: &[f32]| {
            let (x, w) = p.split_at(rows * d);
            let mut out = vec![0.0; rows * d];
            let mut rstd = vec![0.0; rows];
            rmsnorm_forward(&mut out, &mut rstd, x, w, d, eps);
            project(&out, &r)
        };
        assert_ok(check_gradient(
            "rmsnorm",
            &mut packed,
            &analytic,
            &all(analytic.len()),
            1e-2,
            &mut loss,
        ));

        // `accumulate` adds to what is there.
        let mut dx2 = vec![1.0; rows * d];
        let mut dw2 = vec![0.0; d];
        rmsnorm_backward(&mut dx2, &mut dw2, &r, saved, d, true);
        for (a, b) in dx2.iter().zip(&dx) {
            assert!((a - 1.0 - b).abs() < 1e-6);
        }
    }
}

#[test]
fn rope_gradients_both_styles() {
    for style in [RopeStyle::RotateHalf, RopeStyle::Interleaved] {
        let (rows, heads, hd, seq) = (6, 3, 8, 3);
        let table = RopeTable::new(hd, 16, 10000.0, style);
        let x = randn(rows * heads * hd, 4, 0.0, 1.0);
        let r = randn(rows * heads * hd, 5, 0.0, 1.0);
        let pos = Positions {
            first: 2,
            period: seq,
        };
        let mut dx = r.clone();
        rope_backward(&mut dx, heads, &table, pos);
        let mut packed = x.clone();
        let mut loss = |p: &[f32]| {
            let mut y = p.to_vec();
            rope_forward(&mut y, heads, &table, pos);
            project(&y, &r)
        };
        assert_ok(check_gradient(
            "rope",
            &mut packed,
            &dx,
            &all(dx.len()),
            1e-2,
            &mut loss,
        ));
    }
}

#[test]
fn rope_rotates_pairs_by_the_position_angle() {
    // Position 1, head_dim 4: pair 0 rotates by 1 rad, pair 1 by theta^(-1/2) = 0.01 rad.
    for (style, pair_a, pair_b) in [
        (RopeStyle::RotateHalf, (0, 2), (1, 3)),
        (RopeStyle::Interleaved, (0, 1), (2, 3)),
    ] {
        let table = RopeTable::new(4, 4, 10000.0, style);
        let mut x = vec![0.0f32; 4];
        x[pair_a.0] = 1.0;
        x[pair_b.0] = 1.0;
        rope_forward(
            &mut x,
            1,
            &table,
            Positions {
                first: 1,
                period: 1,
            },
        );
        assert!((x[pair_a.0] - 1f32.cos()).abs() < 1e-6 && (x[pair_a.1] - 1f32.sin()).abs() < 1e-6);
        assert!(
            (x[pair_b.0] - 0.01f32.cos()).abs() < 1e-6
                && (x[pair_b.1] - 0.01f32.sin()).abs() < 1e-6
        );
    }
}

#[test]
fn attention_gradients_with_gqa() {
    for (n_heads, n_kv_heads) in [(4, 2), (2, 2), (3, 1)] {
        let s = AttentionShape {
            batch: 2,
            seq: 5,
            n_heads,
            n_kv_heads,
            head_dim: 4,
        };
        let n = s.batch * s.seq;
        let (qd, kvd) = (n_heads * 4, n_kv_heads * 4);
        let q = randn(n * qd, 6, 0.0, 1.0);
        let k = randn(n * kvd, 7, 0.0, 1.0);
        let v = randn(n * kvd, 8, 0.0, 1.0);
        let r = randn(n * qd, 9, 0.0, 1.0);
        let mut out = vec![0.0; n * qd];
        let mut probs = vec![0.0; s.probs_len()];
        attention_forward(&mut out, &mut probs, qkv(&q, &k, &v), &s);
        let (mut dq, mut dk, mut dv) = (vec![0.0; n * qd], vec![0.0; n * kvd], vec![0.0; n * kvd]);
        let g = grads(&mut dq, &mut dk, &mut dv);
        attention_backward(g, &r, &probs, qkv(&q, &k, &v), &s);
        let mut packed = [q, k, v].concat();
        let analytic = [dq, dk, dv].concat();
        let mut loss = |p: &[f32]| {
            let (q, rest) = p.split_at(n * qd);
            let (k, v) = rest.split_at(n * kvd);
            let mut out = vec![0.0; n * qd];
            let mut probs = vec![0.0; s.probs_len()];
            attention_forward(&mut out, &mut probs, qkv(q, k, v), &s);
            project(&out, &r)
        };
        assert_ok(check_gradient(
            "attention",
            &mut packed,
            &analytic,
            &all(analytic.len()),
            1e-2,
            &mut loss,
        ));
    }
}

#[test]
fn attention_is_causal_and_maps_query_heads_to_kv_heads_in_groups() {
    // 4 query heads over 2 kv heads: heads 0,1 read kv head 0; heads 2,3 read kv head 1.
    let s = AttentionShape {
        batch: 1,
        seq: 3,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 2,
    };
    let q = vec![0.0f32; 3 * 8]; // uniform attention
    let k = vec![0.0f32; 3 * 4];
    let mut v = vec![0.0f32; 3 * 4];
    for t in 0..3 {
        v[t * 4] = 10.0 + t as f32; // kv head 0
        v[t * 4 + 2] = 20.0 + t as f32; // kv head 1
    }
    let mut out = vec![0.0; 3 * 8];
    let mut probs = vec![0.0; s.probs_len()];
    attention_forward(&mut out, &mut probs, qkv(&q, &k, &v), &s);
    for t in 0..3 {
        let mean = t as f32 / 2.0; // causal: average of positions 0..=t
        for h in 0..4 {
            let expect = if h < 2 { 10.0 + mean } else { 20.0 + mean };
            assert!(
                (out[t * 8 + h * 2] - expect).abs() < 1e-5,
                "t {t} head {h}: {}",
                out[t * 8 + h * 2]
            );
        }
    }
}

#[test]
fn swiglu_gradients() {
    let n = 37;
    let h1 = randn(n, 10, 0.0, 2.0);
    let h3 = randn(n, 11, 0.0, 1.0);
    let r = randn(n, 12, 0.0, 1.0);
    let (mut dh1, mut dh3) = (vec![0.0; n], vec![0.0; n]);
    swiglu_backward(&mut dh1, &mut dh3, &r, &h1, &h3);
    let mut packed = [h1, h3].concat();
    let analytic = [dh1, dh3].concat();
    let mut loss = |p: &[f32]| {
        let (a, b) = p.split_at(n);
        let mut g = vec![0.0; n];
        swiglu_forward(&mut g, a, b);
        project(&g, &r)
    };
    assert_ok(check_gradient(
        "swiglu",
        &mut packed,
        &analytic,
        &all(2 * n),
        1e-2,
        &mut loss,
    ));
}

#[test]
fn linear_gradients() {
    let (rows, d_in, d_out) = (5, 7, 3);
    let x = randn(rows * d_in, 13, 0.0, 1.0);
    let w = randn(d_out * d_in, 14, 0.0, 1.0);
    let r = randn(rows * d_out, 15, 0.0, 1.0);
    let mut dx = vec![0.0; rows * d_in];
    let mut dw = vec![0.0; d_out * d_in];
    let s = LinearShape { rows, d_in, d_out };
    linear_backward_input(&mut dx, &r, &w, s, false);
    linear_backward_weight(&mut dw, &r, &x, s);
    let mut packed = [x, w].concat();
    let analytic = [dx, dw].concat();
    let mut loss = |p: &[f32]| {
        let (x, w) = p.split_at(rows * d_in);
        let mut y = vec![0.0; rows * d_out];
        linear_forward(&mut y, x, w, s);
        project(&y, &r)
    };
    assert_ok(check_gradient(
        "linear",
        &mut packed,
        &analytic,
        &all(analytic.len()),
        1e-2,
        &mut loss,
    ));
}

#[test]
fn linear_matches_a_naive_matmul_on_large_odd_shapes() {
    // Large enough to take gemm's threaded path.
    let (rows, d_in, d_out) = (67, 129, 93);
    let x = randn(rows * d_in, 16, 0.0, 1.0);
    let w = randn(d_out * d_in, 17, 0.0, 1.0);
    let mut y = vec![0.0; rows * d_out];
    linear_forward(&mut y, &x, &w, LinearShape { rows, d_in, d_out });
    for i in 0..rows {
        for o in 0..d_out {
            let e: f64 = (0..d_in)
                .map(|j| x[i * d_in + j] as f64 * w[o * d_in + j] as f64)
                .sum();
            assert!((y[i * d_out + o] as f64 - e).abs() < 1e-3, "{i},{o}");
        }
    }
}

#[test]
fn embedding_gradients_with_repeated_ids() {
    let (vocab, dim) = (6, 5);
    let ids = [3u32, 1, 3, 0, 5, 3];
    let table = randn(vocab * dim, 18, 0.0, 1.0);
    let r = randn(ids.len() * dim, 19, 0.0, 1.0);
    let mut dtable = vec![0.0; vocab * dim];
    embedding_backward(&mut dtable, &r, &ids, dim);
    let mut packed = table.clone();
    let mut loss = |p: &[f32]| {
        let mut out = vec![0.0; ids.len() * dim];
        embedding_forward(&mut out, p, &ids, dim);
        project(&out, &r)
    };
    assert_ok(check_gradient(
        "embedding",
        &mut packed,
        &dtable,
        &all(vocab * dim),
        1e-2,
        &mut loss,
    ));
}

#[test]
fn cross_entropy_gradients_and_value() {
    let (rows, vocab) = (4, 9);
    let logits = randn(rows * vocab, 20, 0.0, 2.0);
    let targets = [0u32, 8, 3, 3];
    let mut d = logits.clone();
    let sum = cross_entropy_forward_backward(&mut d, &targets, vocab, 1.0 / rows as f32);
    // Direct evaluation in f64.
    let mut expect = 0.0f64;
    for (row, &y) in logits.chunks(vocab).zip(&targets) {
        let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        expect += lse - row[y as usize] as f64;
    }
    assert!((sum - expect).abs() < 1e-5);
    assert!((cross_entropy_loss(&logits, &targets, vocab) - expect).abs() < 1e-5);
    let mut packed = logits.clone();
    let mut loss = |p: &[f32]| cross_entropy_loss(p, &targets, vocab) / rows as f64;
    assert_ok(check_gradient(
        "cross_entropy",
        &mut packed,
        &d,
        &all(rows * vocab),
        1e-2,
        &mut loss,
    ));
}

type AttnForward = fn(&mut [f32], &mut [f32], Qkv, &AttentionShape);
type AttnBackward = fn(QkvGrads, &[f32], &[f32], Qkv, &AttentionShape);

/// Runs an attention implementation (forward, then backward with a fixed `dout`) on random
/// inputs of `s`: returns `[out, probs, dq, dk, dv]`.
fn run_attention(
    s: &AttentionShape,
    seed: u64,
    fwd: AttnForward,
    bwd: AttnBackward,
) -> [Vec<f32>; 5] {
    let n = s.batch * s.seq;
    let (qd, kvd) = (s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim);
    let q = randn(n * qd, seed, 0.0, 1.0);
    let k = randn(n * kvd, seed + 1, 0.0, 1.0);
    let v = randn(n * kvd, seed + 2, 0.0, 1.0);
    let dout = randn(n * qd, seed + 3, 0.0, 1.0);
    let mut out = vec![0.0; n * qd];
    let mut probs = vec![0.0; s.probs_len()];
    let (mut dq, mut dk, mut dv) = (vec![0.0; n * qd], vec![0.0; n * kvd], vec![0.0; n * kvd]);
    fwd(&mut out, &mut probs, qkv(&q, &k, &v), s);
    bwd(
        grads(&mut dq, &mut dk, &mut dv),
        &dout,
        &probs,
        qkv(&q, &k, &v),
        s,
    );
    [out, probs, dq, dk, dv]
}

fn shape(
    batch: usize,
    seq: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
) -> AttentionShape {
    AttentionShape {
        batch,
        seq,
        n_heads,
        n_kv_heads,
        head_dim,
    }
}

#[test]
fn fast_attention_matches_the_reference_on_odd_shapes() {
    use handgrad::backend::cpu::attention::{
        attention_backward_reference, attention_forward_reference,
    };
    for s in [
        shape(1, 1, 2, 1, 4),
        shape(2, 37, 4, 2, 6),
        shape(1, 70, 3, 3, 128),
        shape(3, 33, 8, 2, 16),
    ] {
        let fast = run_attention(&s, 30, attention_forward, attention_backward);
        let slow = run_attention(
            &s,
            30,
            attention_forward_reference,
            attention_backward_reference,
        );
        for (name, (a, b)) in ["out", "probs", "dq", "dk", "dv"]
            .iter()
            .zip(fast.iter().zip(&slow))
        {
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 2e-5, "{name} differs by {worst} for {s:?}");
        }
    }
}

#[test]
fn bf16_attention_matches_the_reference_within_bf16_rounding() {
    use handgrad::backend::cpu::attention::{
        attention_backward_bf16, attention_backward_reference, attention_forward_bf16,
        attention_forward_reference,
    };
    // Without AVX512_BF16 this runs the portable emulation, which has the same numerics.
    for s in [
        shape(1, 1, 2, 1, 4),
        shape(2, 37, 4, 2, 6),
        shape(1, 130, 2, 2, 64),
    ] {
        let fast = run_attention(&s, 40, attention_forward_bf16, attention_backward_bf16);
        let exact = run_attention(
            &s,
            40,
            attention_forward_reference,
            attention_backward_reference,
        );
        // Compared as before the refactor: outputs and gradients (not the probabilities).
        for (name, i) in [("out", 0), ("dq", 2), ("dk", 3), ("dv", 4)] {
            let (a, b) = (&fast[i], &exact[i]);
            let norm = b.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
            let err = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y) * (x - y))
                .sum::<f32>()
                .sqrt();
            // bf16 keeps 8 mantissa bits: a relative error of a few 1e-3 is expected.
            assert!(
                err / norm < 2e-2,
                "{name}: relative error {} for {s:?}",
                err / norm
            );
        }
    }
}
