//! Residual connections: `out = a + b`. The backward pass needs no kernel of its own: the
//! gradient of a sum flows unchanged to both inputs, which the model realises by accumulating
//! into the residual-stream gradient (`rmsnorm_backward(..., accumulate = true)`).

use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// Forward. Shapes: `a, b, out [rows, dim]`; `out = a + b`.
pub fn residual_add(out: &mut [f32], a: &[f32], b: &[f32]) {
    debug_assert!(out.len() == a.len() && a.len() == b.len());
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| {
            for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
                *o = x + y;
            }
        });
}
