//! SwiGLU gate: `g = silu(h1) * h3`, with `silu(a) = a * sigmoid(a)`.

use rayon::prelude::*;

const CHUNK: usize = 4096;

use super::math::sigmoid;

/// Forward. Shapes: `h1` (gate projection), `h3` (up projection) `[rows, ffn]` -> `g [rows, ffn]`.
pub fn swiglu_forward(g: &mut [f32], h1: &[f32], h3: &[f32]) {
    g.par_chunks_mut(CHUNK)
        .zip(h1.par_chunks(CHUNK))
        .zip(h3.par_chunks(CHUNK))
        .for_each(|((g, h1), h3)| {
            for ((g, &a), &b) in g.iter_mut().zip(h1).zip(h3) {
                *g = a * sigmoid(a) * b;
            }
        });
}

/// Backward. Shapes: `dg, h1, h3 [rows, ffn]` -> `dh1, dh3 [rows, ffn]` (overwritten):
/// `dh1 = dg * h3 * sigmoid(h1) * (1 + h1 * (1 - sigmoid(h1)))`, `dh3 = dg * silu(h1)`.
pub fn swiglu_backward(dh1: &mut [f32], dh3: &mut [f32], dg: &[f32], h1: &[f32], h3: &[f32]) {
    dh1.par_chunks_mut(CHUNK)
        .zip(dh3.par_chunks_mut(CHUNK))
        .zip(dg.par_chunks(CHUNK))
        .zip(h1.par_chunks(CHUNK).zip(h3.par_chunks(CHUNK)))
        .for_each(|(((dh1, dh3), dg), (h1, h3))| {
            for ((d1, d3), ((&g, &a), &b)) in dh1
                .iter_mut()
                .zip(dh3.iter_mut())
                .zip(dg.iter().zip(h1).zip(h3))
            {
                let s = sigmoid(a);
                *d1 = g * b * s * (1.0 + a * (1.0 - s));
                *d3 = g * a * s;
            }
        });
}
