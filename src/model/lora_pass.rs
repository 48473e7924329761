//! The forward and backward products of LoRA adapters (layout and names in
//! [`crate::model::lora`]).
//!
//! For an adapted projection with input `x [rows, in]`, scale `s = alpha / r`, dropout mask
//! `m` (`drop(x) = x * m / (1 - p)`, `m` all ones without dropout):
//! ```text
//! forward:   u  = drop(x) A^T                 [rows, r]    saved
//!            y += s * u B^T                   [rows, out]
//! backward:  dB += s * dy^T u                 [out, r]
//!            du  = s * dy B                   [rows, r]
//!            dA += du^T drop(x)               [r, in]
//!            dx += (du A) * m / (1 - p)       [rows, in]
//! ```
//! The base matrix gets no weight gradient: its input gradient `dy W` is formed by the model's
//! own kernels, the adapter adds its term to the same buffer. The products run on the CPU
//! kernels the step uses (rank-`r` products are small and memory-bound; an accelerator would
//! gain nothing on them).
//!
//! Dropout masks are not stored: each element's keep/drop decision is a hash of the step's
//! seed, the layer, the projection and the element's index, so the backward pass (and a resumed
//! run) draws exactly the masks of the forward pass.

use super::lora::{AdapterIds, LoraLayout, LoraTarget};
use crate::backend::{Kernels, LinearShape, Matrix};
use crate::error::Result;

/// Adapters as one pass reads them.
#[derive(Debug, Clone, Copy)]
pub struct Adapters<'a> {
    pub layout: &'a LoraLayout,
    /// The flat adapter buffer (`layout.total()` values).
    pub params: &'a [f32],
    /// Seed of this micro-batch's dropout masks; `None` turns dropout off (evaluation,
    /// generation).
    pub dropout_seed: Option<u64>,
}

impl Adapters<'_> {
    /// The adapter of projection `t` of layer `l`, if it has one.
    pub fn of(&self, l: usize, t: LoraTarget) -> Option<AdapterIds> {
        self.layout.layers[l][t.index()]
    }

    fn dropout(&self) -> Option<(u64, f32)> {
        let p = self.layout.cfg.dropout as f32;
        match self.dropout_seed {
            Some(seed) if p > 0.0 => Some((seed, p)),
            _ => None,
        }
    }
}

/// What the adapters keep between the forward and the backward pass, and their scratch.
#[derive(Debug)]
pub struct LoraActs {
    rows: usize,
    /// `[layer][target]`: `u = drop(x) A^T` `[rows, r]` (empty where not adapted).
    u: Vec<[Vec<f32>; 7]>,
    /// The term each adapted projection adds to its output `[rows, out]`, for the layer being
    /// computed (reused across layers).
    pub delta: [Vec<f32>; 7],
    /// `drop(x)` `[rows, max in]` (dropout only).
    dropped: Vec<f32>,
    /// `du` `[rows, r]`.
    du: Vec<f32>,
    /// `du A` before the dropout mask `[rows, max in]` (dropout only).
    dx_dropped: Vec<f32>,
    /// Where the gradients of frozen norm gains go (discarded) `[max norm width]`.
    pub frozen_dw: Vec<f32>,
}

impl LoraActs {
    /// Buffers for `rows` token rows.
    pub fn new(layout: &LoraLayout, rows: usize, norm_width: usize) -> Self {
        let r = layout.cfg.rank;
        let mut delta: [Vec<f32>; 7] = Default::default();
        let mut max_in = 0;
        let u = layout
            .layers
            .iter()
            .map(|ids| {
                let mut per: [Vec<f32>; 7] = Default::default();
                for (slot, id) in per.iter_mut().zip(ids) {
                    if id.is_some() {
                        *slot = vec![0.0; rows * r];
                    }
                }
                per
            })
            .collect();
        if let Some(first) = layout.layers.first() {
            for (slot, id) in delta.iter_mut().zip(first) {
                if let Some(id) = id {
                    *slot = vec![0.0; rows * id.d_out];
                    max_in = max_in.max(id.d_in);
                }
            }
        }
        let with_dropout = layout.cfg.dropout > 0.0;
        let drop_len = if with_dropout { rows * max_in } else { 0 };
        LoraActs {
            rows,
            u,
            delta,
            dropped: vec![0.0; drop_len],
            du: vec![0.0; rows * r],
            dx_dropped: vec![0.0; drop_len],
            frozen_dw: vec![0.0; norm_width],
        }
    }

    /// Bytes these buffers take for `rows` rows, without allocating.
    pub fn bytes_needed(layout: &LoraLayout, rows: usize, norm_width: usize) -> usize {
        let r = layout.cfg.rank;
        let adapted = layout.layers.iter().flatten().flatten().count();
        let (mut delta, mut max_in) = (0, 0);
        if let Some(first) = layout.layers.first() {
            for id in first.iter().flatten() {
                delta += rows * id.d_out;
                max_in = max_in.max(id.d_in);
            }
        }
        let drop = if layout.cfg.dropout > 0.0 {
            2 * rows * max_in
        } else {
            0
        };
        4 * (adapted * rows * r + delta + drop + rows * r + norm_width)
    }

    /// Rows these buffers are for.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// Keeps or drops element `i` of projection `t`'s input in layer `l`: a hash, so the same
/// decision comes back in the backward pass.
fn keeps(seed: u64, l: usize, t: LoraTarget, i: usize, p: f32) -> bool {
    let mut z = seed
        ^ ((l as u64) << 48)
        ^ ((t.index() as u64) << 40)
        ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // splitmix64's finaliser.
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as f32) / ((1u64 << 24) as f32) >= p
}

/// Writes `drop(x)` into `out` (same length as `x`).
fn drop_into(out: &mut [f32], x: &[f32], seed: u64, l: usize, t: LoraTarget, p: f32) {
    let keep = 1.0 / (1.0 - p);
    for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        *o = if keeps(seed, l, t, i, p) {
            v * keep
        } else {
            0.0
        };
    }
}

/// Forward of the adapter of projection `t` in layer `l` on input `x [rows, in]`: saves `u`
/// and leaves `s * u B^T` in `acts.delta[t]`. Does nothing when `t` is not adapted.
pub fn forward(
    k: &dyn Kernels,
    ad: &Adapters,
    l: usize,
    t: LoraTarget,
    x: &[f32],
    acts: &mut LoraActs,
) -> Result<()> {
    let Some(id) = ad.of(l, t) else {
        return Ok(());
    };
    let (rows, r, s) = (acts.rows, ad.layout.cfg.rank, ad.layout.cfg.scale());
    let x = match ad.dropout() {
        Some((seed, p)) => {
            let dst = &mut acts.dropped[..rows * id.d_in];
            drop_into(dst, x, seed, l, t, p);
            &*dst
        }
        None => x,
    };
    let u = &mut acts.u[l][t.index()];
    let a = Matrix::new(ad.layout.view(ad.params, id.a), r, id.d_in);
    k.linear_forward(u, x, a, rows)?;
    let b = Matrix::new(ad.layout.view(ad.params, id.b), id.d_out, r);
    let delta = &mut acts.delta[t.index()];
    k.linear_forward(delta, u, b, rows)?;
    for v in delta.iter_mut() {
        *v *= s;
    }
    Ok(())
}

/// Backward of the adapter of projection `t` in layer `l`: `x` is the projection's input as
/// in the forward pass, `dy [rows, out]` the gradient of its output. Adds the adapter's weight
/// gradients into `grads` (the adapter layout) and its input gradient into `dx [rows, in]`.
/// Does nothing when `t` is not adapted.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    k: &dyn Kernels,
    ad: &Adapters,
    l: usize,
    t: LoraTarget,
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    grads: &mut [f32],
    acts: &mut LoraActs,
) -> Result<()> {
    let Some(id) = ad.of(l, t) else {
        return Ok(());
    };
    let (rows, r, s) = (acts.rows, ad.layout.cfg.rank, ad.layout.cfg.scale());
    let lay = ad.layout;
    let u = &acts.u[l][t.index()];
    // dB += s * dy^T u: the scale is folded into du's copy below, so scale u here.
    let up = LinearShape {
        rows,
        d_in: r,
        d_out: id.d_out,
    };
    acts.du.copy_from_slice(u);
    for v in acts.du.iter_mut() {
        *v *= s;
    }
    k.linear_backward_weight(lay.view_mut(grads, id.b), dy, &acts.du, up)?;
    // du = s * dy B.
    k.linear_backward_input(&mut acts.du, dy, lay.view(ad.params, id.b), up, false)?;
    for v in acts.du.iter_mut() {
        *v *= s;
    }
    let down = LinearShape {
        rows,
        d_in: id.d_in,
        d_out: r,
    };
    let a = lay.view(ad.params, id.a);
    match ad.dropout() {
        None => {
            k.linear_backward_weight(lay.view_mut(grads, id.a), &acts.du, x, down)?;
            k.linear_backward_input(dx, &acts.du, a, down, true)?;
        }
        Some((seed, p)) => {
            let n = rows * id.d_in;
            drop_into(&mut acts.dropped[..n], x, seed, l, t, p);
            k.linear_backward_weight(
                lay.view_mut(grads, id.a),
                &acts.du,
                &acts.dropped[..n],
                down,
            )?;
            let dxd = &mut acts.dx_dropped[..n];
            k.linear_backward_input(dxd, &acts.du, a, down, false)?;
            // drop(x) is linear in x with the same mask: its transpose applies it again.
            let keep = 1.0 / (1.0 - p);
            for (i, (o, &g)) in dx.iter_mut().zip(dxd.iter()).enumerate() {
                if keeps(seed, l, t, i, p) {
                    *o += g * keep;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_masks_repeat_and_have_the_right_rate() {
        let p = 0.25;
        let n = 40_000;
        let kept = (0..n)
            .filter(|&i| keeps(7, 1, LoraTarget::Up, i, p))
            .count();
        let rate = 1.0 - kept as f64 / n as f64;
        // Binomial: 4 standard deviations of the rate.
        let sd = (p as f64 * (1.0 - p as f64) / n as f64).sqrt();
        assert!((rate - p as f64).abs() < 4.0 * sd, "rate {rate}");
        let a: Vec<bool> = (0..100)
            .map(|i| keeps(7, 1, LoraTarget::Up, i, p))
            .collect();
        let b: Vec<bool> = (0..100)
            .map(|i| keeps(7, 1, LoraTarget::Up, i, p))
            .collect();
        let c: Vec<bool> = (0..100)
            .map(|i| keeps(8, 1, LoraTarget::Up, i, p))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
