//! Residual connections: `x += branch`. The backward pass needs no kernel of its own: the
//! gradient of a sum flows unchanged to both inputs, which the model realises by accumulating
//! into the residual-stream gradient (`rmsnorm_backward(..., accumulate = true)`).

use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// Forward, in place. Shapes: `acc, x [rows, dim]`; `acc = acc + x`.
pub fn residual_add(acc: &mut [f32], x: &[f32]) {
    debug_assert_eq!(acc.len(), x.len());
    acc.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(a, x)| {
            for (a, &v) in a.iter_mut().zip(x) {
                *a += v;
            }
        });
}
