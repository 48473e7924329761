//! Rotary position embedding (RoPE) in both pairing conventions.

use crate::model::config::RopeStyle;

/// Precomputed `cos`/`sin` of `pos * theta^(-2j/head_dim)`, shape `[max_pos, head_dim/2]`.
#[derive(Debug, Clone)]
pub struct RopeTable {
    pub head_dim: usize,
    pub style: RopeStyle,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Tables for positions `0..max_pos`. Frequencies are computed in f32 as transformers does
    /// (`1 / theta^(2j/d)`, then `pos * inv_freq`), the trigonometry in f64.
    pub fn new(head_dim: usize, max_pos: usize, theta: f64, style: RopeStyle) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|j| 1.0 / (theta as f32).powf((2 * j) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for &f in &inv_freq {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTable {
            head_dim,
            style,
            cos,
            sin,
        }
    }

    /// Positions covered by the table.
    pub fn max_pos(&self) -> usize {
        self.cos.len() / (self.head_dim / 2).max(1)
    }

    /// Rotates one head vector in place by the angles of `pos`; `sign` -1 undoes the rotation.
    #[inline]
    fn rotate(&self, v: &mut [f32], pos: usize, sign: f32) {
        let half = self.head_dim / 2;
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];
        match self.style {
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
}

/// Forward, in place. Shape: `x [rows, heads * head_dim]`; row `i` sits at position
/// `pos(i)` (for a batch of sequences of length T, `i % T`; for decoding, the cache position).
pub fn rope_forward(x: &mut [f32], heads: usize, table: &RopeTable, pos: impl Fn(usize) -> usize) {
    let hd = table.head_dim;
    for (i, row) in x.chunks_exact_mut(heads * hd).enumerate() {
        let p = pos(i);
        for head in row.chunks_exact_mut(hd) {
            table.rotate(head, p, 1.0);
        }
    }
}

/// Backward, in place: the rotation is orthogonal, so the gradient is rotated back.
/// Shape: `dx [rows, heads * head_dim]`.
pub fn rope_backward(
    dx: &mut [f32],
    heads: usize,
    table: &RopeTable,
    pos: impl Fn(usize) -> usize,
) {
    let hd = table.head_dim;
    for (i, row) in dx.chunks_exact_mut(heads * hd).enumerate() {
        let p = pos(i);
        for head in row.chunks_exact_mut(hd) {
            table.rotate(head, p, -1.0);
        }
    }
}
