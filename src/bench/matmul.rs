//! Matrix-multiply throughput on the shapes of a model's training step.

use std::time::Instant;

use serde::Serialize;

use crate::backend::{Kernels, LinearShape, Matrix};
use crate::error::Result;
use crate::model::ModelConfig;
use crate::util::rng::Rng;

/// One measured matmul.
#[derive(Debug, Clone, Serialize)]
pub struct MatmulResult {
    /// Which weight (`q_proj`, `mlp.down_proj`, `classifier`, ...).
    pub weight: String,
    /// `fwd` (x W^T), `dgrad` (dy W) or `wgrad` (dy^T x).
    pub pass: String,
    /// `[m, k] x [k, n]`.
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub ms: f64,
    pub gflops: f64,
    /// Largest relative error of 64 sampled outputs against an f64 product of the same data
    /// (relative to the sum of the absolute terms, so cancellation does not inflate it).
    pub max_rel_err: f64,
    /// The product was checked and within the precision's tolerance.
    pub verified: bool,
}

/// Error allowed in the check: f32 accumulation, or bf16 operands.
pub fn tolerance(bf16: bool) -> f64 {
    if bf16 { 1e-2 } else { 1e-4 }
}

/// Compares 64 sampled entries of `out [m, n]` with `f(i, j) = (sum of terms, sum of |terms|)`.
fn check(out: &[f32], m: usize, n: usize, exact: impl Fn(usize, usize) -> (f64, f64)) -> f64 {
    let mut rng = Rng::new(99);
    let mut worst = 0.0f64;
    for _ in 0..64 {
        let (i, j) = (rng.below(m as u64) as usize, rng.below(n as u64) as usize);
        let (v, mag) = exact(i, j);
        let got = out[i * n + j] as f64;
        let e = (got - v).abs() / mag.max(1e-30);
        worst = worst.max(if e.is_nan() { f64::INFINITY } else { e });
    }
    worst
}

/// The distinct weight shapes of a model: (name, d_in, d_out).
pub fn weight_shapes(cfg: &ModelConfig) -> Vec<(String, usize, usize)> {
    let (d, q, kv, f) = (cfg.dim, cfg.q_dim(), cfg.kv_dim(), cfg.ffn_dim);
    let mut v = vec![
        ("self_attn.q_proj".to_string(), d, q),
        ("self_attn.k_proj / v_proj".to_string(), d, kv),
        ("self_attn.o_proj".to_string(), q, d),
        ("mlp.gate_proj / up_proj".to_string(), d, f),
        ("mlp.down_proj".to_string(), f, d),
        ("classifier".to_string(), d, cfg.vocab_size),
    ];
    if kv == q {
        v.remove(1);
        v[0].0 = "self_attn.q/k/v_proj".into();
    }
    v
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| (r.uniform() - 0.5) as f32).collect()
}

fn time_it(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm up (page faults, packing buffers)
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Times the forward, input-gradient and weight-gradient matmuls of every weight shape for
/// `rows` tokens (best of `reps`).
pub fn run(
    k: &dyn Kernels,
    cfg: &ModelConfig,
    rows: usize,
    reps: usize,
) -> Result<Vec<MatmulResult>> {
    run_shapes(k, &weight_shapes(cfg), rows, reps, false)
}

/// [`run`] on given `(name, d_in, d_out)` shapes; `bf16` sets the check's tolerance.
pub fn run_shapes(
    k: &dyn Kernels,
    shapes: &[(String, usize, usize)],
    rows: usize,
    reps: usize,
    bf16: bool,
) -> Result<Vec<MatmulResult>> {
    let mut out = Vec::new();
    let tol = tolerance(bf16);
    for (name, d_in, d_out) in shapes.iter().cloned() {
        let x = random(rows * d_in, 1);
        let w = random(d_out * d_in, 2);
        let dy = random(rows * d_out, 3);
        let mut y = vec![0.0f32; rows * d_out];
        let mut dx = vec![0.0f32; rows * d_in];
        let mut dw = vec![0.0f32; d_out * d_in];
        let flops = 2.0 * (rows * d_in * d_out) as f64;
        let mut push = |pass: &str, m, kk, n, s: f64, err: f64| {
            out.push(MatmulResult {
                weight: name.clone(),
                pass: pass.into(),
                m,
                k: kk,
                n,
                ms: s * 1e3,
                gflops: flops / s / 1e9,
                max_rel_err: err,
                verified: err <= tol,
            })
        };
        let shape = LinearShape { rows, d_in, d_out };
        let wm = Matrix::new(&w, d_out, d_in);
        let dot = |n: usize, a: &dyn Fn(usize) -> f64, b: &dyn Fn(usize) -> f64| {
            (0..n).fold((0.0, 0.0), |(s, m), t| {
                let p = a(t) * b(t);
                (s + p, m + p.abs())
            })
        };
        let s = time_it(reps, || k.linear_forward(&mut y, &x, wm, rows))?;
        let err = check(&y, rows, d_out, |r, o| {
            dot(d_in, &|i| x[r * d_in + i] as f64, &|i| {
                w[o * d_in + i] as f64
            })
        });
        push("fwd", rows, d_in, d_out, s, err);
        let s = time_it(reps, || {
            k.linear_backward_input(&mut dx, &dy, &w, shape, false)
        })?;
        let err = check(&dx, rows, d_in, |r, i| {
            dot(d_out, &|o| dy[r * d_out + o] as f64, &|o| {
                w[o * d_in + i] as f64
            })
        });
        push("dgrad", rows, d_out, d_in, s, err);
        let s = time_it(reps, || k.linear_backward_weight(&mut dw, &dy, &x, shape))?;
        // The weight gradient accumulates: check one fresh product.
        dw.fill(0.0);
        k.linear_backward_weight(&mut dw, &dy, &x, shape)?;
        let err = check(&dw, d_out, d_in, |o, i| {
            dot(rows, &|r| dy[r * d_out + o] as f64, &|r| {
                x[r * d_in + i] as f64
            })
        });
        push("wgrad", d_out, rows, d_in, s, err);
    }
    Ok(out)
}

/// Error allowed in the int8 check: the integer sums are exact, so only the f32 scaling and
/// accumulation of the group sums differ from an f64 product of the dequantised operands.
pub const INT8_TOLERANCE: f64 = 1e-5;

/// The forward products of `shapes` with int8 weights and activations (Q8_0 in groups of up
/// to 64, the activations quantised inside the timed call, as `generate --weights q8` runs
/// them), each checked against an f64 product of the dequantised operands. `gflops` counts a
/// multiply and an add as two operations, as for floating point.
pub fn run_int8(
    shapes: &[(String, usize, usize)],
    rows: usize,
    reps: usize,
) -> Result<Vec<MatmulResult>> {
    use crate::backend::cpu::quant::{Q8Rows, Q8Tensor, group_for, matmul_q8};
    let mut out = Vec::new();
    for (name, d_in, d_out) in shapes.iter().cloned() {
        let group = group_for(&[d_in]);
        let x = random(rows * d_in, 1);
        let w = Q8Tensor::quantize(&random(d_out * d_in, 2), group);
        let mut y = vec![0.0f32; rows * d_out];
        let s = time_it(reps, || {
            matmul_q8(&mut y, &x, rows, w.view(), d_out, d_in);
            Ok(())
        })?;
        let xq = Q8Rows::quantize(&x, rows, d_in, group);
        let err = check(&y, rows, d_out, |r, o| {
            (0..d_in).fold((0.0, 0.0), |(sum, mag), i| {
                let a = xq.q[r * d_in + i] as f64 * xq.scales[(r * d_in + i) / group] as f64;
                let b = w.q[o * d_in + i] as f64 * w.scales[(o * d_in + i) / group] as f64;
                (sum + a * b, mag + (a * b).abs())
            })
        });
        out.push(MatmulResult {
            weight: name,
            pass: "fwd".into(),
            m: rows,
            k: d_in,
            n: d_out,
            ms: s * 1e3,
            gflops: 2.0 * (rows * d_in * d_out) as f64 / s / 1e9,
            max_rel_err: err,
            verified: err <= INT8_TOLERANCE,
        });
    }
    Ok(out)
}
