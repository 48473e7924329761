//! Rotary position embedding (RoPE) in both pairing conventions, with the angles of a
//! [`RopeTable`].

use rayon::prelude::*;

use crate::backend::types::{Positions, RopeStyle, RopeTable};

/// Rotates one head vector in place by the angles of `pos`; `sign` -1 undoes the rotation.
#[inline]
fn rotate(table: &RopeTable, v: &mut [f32], pos: usize, sign: f32) {
    let half = table.head_dim / 2;
    let (cos, sin) = (table.cos(pos), table.sin(pos));
    match table.style {
        RopeStyle::RotateHalf => {
            let (a, b) = v.split_at_mut(half);
            for (((x1, x2), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
                let (v1, v2, s) = (*x1, *x2, sign * s);
                *x1 = v1 * c - v2 * s;
                *x2 = v2 * c + v1 * s;
            }
        }
        RopeStyle::Interleaved => {
            for (j, pair) in v.chunks_exact_mut(2).enumerate() {
                let (x1, x2) = (pair[0], pair[1]);
                let (c, s) = (cos[j], sign * sin[j]);
                pair[0] = x1 * c - x2 * s;
                pair[1] = x2 * c + x1 * s;
            }
        }
    }
}

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 64;

fn apply(x: &mut [f32], heads: usize, table: &RopeTable, pos: Positions, sign: f32) {
    let width = heads * table.head_dim;
    if width == 0 {
        return;
    }
    let rows = x.len() / width;
    let x = &mut x[..rows * width];
    let block = |(t, block): (usize, &mut [f32])| {
        for (i, row) in block.chunks_exact_mut(width).enumerate() {
            let p = pos.of(t * ROWS_PER_TASK + i);
            for head in row.chunks_exact_mut(table.head_dim) {
                rotate(table, head, p, sign);
            }
        }
    };
    if rows <= ROWS_PER_TASK {
        block((0, x));
    } else {
        x.par_chunks_mut(width * ROWS_PER_TASK)
            .enumerate()
            .for_each(block);
    }
}

/// Forward, in place. Shape: `x [rows, heads * head_dim]`; row `i` sits at position
/// `pos.of(i)`.
pub fn rope_forward(x: &mut [f32], heads: usize, table: &RopeTable, pos: Positions) {
    apply(x, heads, table, pos, 1.0)
}

/// Backward, in place: the rotation is orthogonal, so the gradient is rotated back.
/// Shape: `dx [rows, heads * head_dim]`.
pub fn rope_backward(dx: &mut [f32], heads: usize, table: &RopeTable, pos: Positions) {
    apply(dx, heads, table, pos, -1.0)
}
