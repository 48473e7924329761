//! Rotary position embedding (RoPE) in both pairing conventions, with the angles of a
//! [`RopeTable`].

use crate::backend::types::{Positions, RopeStyle, RopeTable};

/// Rotates one head vector in place by the angles of `pos`; `sign` -1 undoes the rotation.
#[inline]
fn rotate(table: &RopeTable, v: &mut [f32], pos: usize, sign: f32) {
    let half = table.head_dim / 2;
    let (cos, sin) = (table.cos(pos), table.sin(pos));
    match table.style {
        RopeStyle::RotateHalf => {
            let (a, b) = v.split_at_mut(half);
            for j in 0..half {
                let (x1, x2) = (a[j], b[j]);
                let (c, s) = (cos[j], sign * sin[j]);
                a[j] = x1 * c - x2 * s;
                b[j] = x2 * c + x1 * s;
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

fn apply(x: &mut [f32], heads: usize, table: &RopeTable, pos: Positions, sign: f32) {
    let hd = table.head_dim;
    for (i, row) in x.chunks_exact_mut(heads * hd).enumerate() {
        let p = pos.of(i);
        for head in row.chunks_exact_mut(hd) {
            rotate(table, head, p, sign);
        }
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
