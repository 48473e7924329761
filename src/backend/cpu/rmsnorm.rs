//! RMSNorm: `y = w * x / sqrt(mean(x^2) + eps)`, row by row.
//!
//! Also used per head for Qwen3's q/k norm (rows of `head_dim`).

use rayon::prelude::*;

use super::math::{dot, dot3};
use crate::backend::types::NormSaved;

/// Rows per parallel task; small enough to balance, large enough to amortise scheduling.
const ROWS_PER_TASK: usize = 16;

/// Forward. Shapes: `x [rows, d]`, `w [d]` -> `out [rows, d]`, `rstd [rows]` where
/// `rstd = 1/sqrt(mean(x^2) + eps)` is saved for the backward pass.
pub fn rmsnorm_forward(
    out: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    w: &[f32],
    d: usize,
    eps: f32,
) {
    debug_assert_eq!(x.len(), out.len());
    debug_assert_eq!(x.len(), rstd.len() * d);
    out.par_chunks_mut(d * ROWS_PER_TASK)
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .zip(x.par_chunks(d * ROWS_PER_TASK))
        .for_each(|((out, rstd), x)| {
            for ((o, r), xr) in out
                .chunks_exact_mut(d)
                .zip(rstd.iter_mut())
                .zip(x.chunks_exact(d))
            {
                let ss = dot(xr, xr);
                let inv = 1.0 / (ss / d as f32 + eps).sqrt();
                *r = inv;
                for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
                    *o = xv * inv * wv;
                }
            }
        });
}

/// Backward. Shapes: `dy [rows, d]`; from the forward `x [rows, d]`, `w [d]`, `rstd [rows]` ->
/// `dx [rows, d]`, `dw [d]` (accumulated).
///
/// With `r = rstd` and `xhat = x * r`:
/// `dx_i = r * (w_i dy_i - xhat_i * mean_j(w_j dy_j xhat_j))`
///       `= r * (w_i dy_i - x_i r^2 / d * sum_j w_j dy_j x_j)`
/// and `dw_i += sum_rows dy_i xhat_i`. When `accumulate` is true `dx` is added to (this is how
/// the residual stream's gradient flows through a pre-norm block), otherwise overwritten.
pub fn rmsnorm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    dy: &[f32],
    saved: NormSaved,
    d: usize,
    accumulate: bool,
) {
    let NormSaved { x, w, rstd } = saved;
    debug_assert_eq!(dx.len(), x.len());
    debug_assert_eq!(dy.len(), x.len());
    // dx in parallel over row blocks; dw partial sums per block, reduced in a fixed order so the
    // result does not depend on thread scheduling.
    let partial_dw: Vec<Vec<f32>> = dx
        .par_chunks_mut(d * ROWS_PER_TASK)
        .zip(dy.par_chunks(d * ROWS_PER_TASK))
        .zip(x.par_chunks(d * ROWS_PER_TASK))
        .zip(rstd.par_chunks(ROWS_PER_TASK))
        .map(|(((dx, dy), x), rstd)| {
            let mut dw_local = vec![0.0f32; d];
            for (((dxr, dyr), xr), &r) in dx
                .chunks_exact_mut(d)
                .zip(dy.chunks_exact(d))
                .zip(x.chunks_exact(d))
                .zip(rstd)
            {
                let c = dot3(w, dyr, xr) * r * r / d as f32;
                for (i, o) in dxr.iter_mut().enumerate() {
                    let v = r * (w[i] * dyr[i] - xr[i] * c);
                    if accumulate {
                        *o += v;
                    } else {
                        *o = v;
                    }
                    dw_local[i] += dyr[i] * xr[i] * r;
                }
            }
            dw_local
        })
        .collect();
    for part in partial_dw {
        for (a, b) in dw.iter_mut().zip(part) {
            *a += b;
        }
    }
}
