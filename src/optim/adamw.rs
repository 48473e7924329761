//! AdamW over the flat parameter buffer, with parameter groups (decay / no decay).
//!
//! The update follows PyTorch's `torch.optim.AdamW` exactly:
//! `p *= 1 - lr * wd`; `m = b1 m + (1 - b1) g`; `v = b2 v + (1 - b2) g^2`;
//! `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::model::{ParamLayout, TensorSpec};

/// Hyper-parameters of AdamW.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay applied to matrices and embeddings; norm gains get none.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// Optimizer state: both moments (same layout as the parameters) and the update count.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Updates applied so far.
    pub t: u64,
    /// Per-element weight-decay mask as ranges: `(start, end, decays)`.
    groups: Vec<(usize, usize, bool)>,
}

const CHUNK: usize = 1 << 14;

impl AdamW {
    /// Fresh state for a parameter layout.
    pub fn new(cfg: AdamWConfig, layout: &ParamLayout) -> Self {
        Self::for_tensors(cfg, &layout.tensors, layout.total())
    }

    /// Fresh state for `n` parameters laid out as `tensors` (a model's, or LoRA adapters').
    pub fn for_tensors(cfg: AdamWConfig, tensors: &[TensorSpec], n: usize) -> Self {
        let mut groups: Vec<(usize, usize, bool)> = Vec::new();
        for t in tensors {
            let r = t.range();
            match groups.last_mut() {
                Some(last) if last.1 == r.start && last.2 == t.decays() => last.1 = r.end,
                _ => groups.push((r.start, r.end, t.decays())),
            }
        }
        AdamW {
            cfg,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
            groups,
        }
    }

    /// Applies one update with learning rate `lr` to `params` from `grad_scale * grads` (the
    /// scale folds gradient averaging and clipping into this single pass over memory).
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64, grad_scale: f32) {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        let step_size = (lr / bc1) as f32;
        let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
        let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        for &(start, end, decays) in &self.groups {
            let decay = if decays {
                (1.0 - lr * c.weight_decay) as f32
            } else {
                1.0
            };
            params[start..end]
                .par_chunks_mut(CHUNK)
                .zip(grads[start..end].par_chunks(CHUNK))
                .zip(self.m[start..end].par_chunks_mut(CHUNK))
                .zip(self.v[start..end].par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| {
                    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v) {
                        let gi = g * grad_scale;
                        *m = b1 * *m + (1.0 - b1) * gi;
                        *v = b2 * *v + (1.0 - b2) * gi * gi;
                        let denom = v.sqrt() * inv_sqrt_bc2 + eps;
                        *p = *p * decay - step_size * *m / denom;
                    }
                });
        }
    }
}

/// The gradient norm of an update and the factor that averages and clips it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateScale {
    /// Global L2 norm of the averaged gradient, before clipping.
    pub grad_norm: f64,
    /// Whether clipping scaled it down.
    pub clipped: bool,
    /// Factor to apply to the accumulated gradient: `1/micro_steps`, times `clip/norm` when
    /// clipping.
    pub factor: f32,
}

/// Computes the averaging and clipping factor of accumulated gradients in one read of the
/// buffer. `divisor` turns the buffer into the mean gradient: the number of micro-batches whose
/// mean-loss gradients were summed, times the loss scale they were computed with.
pub fn update_scale(grads: &[f32], divisor: f64, clip: f64) -> UpdateScale {
    let divisor = if divisor > 0.0 { divisor } else { 1.0 };
    let grad_norm = global_norm(grads) / divisor;
    let clipped = clip > 0.0 && grad_norm > clip;
    let factor = (1.0 / divisor) * if clipped { clip / grad_norm } else { 1.0 };
    UpdateScale {
        grad_norm,
        clipped,
        factor: factor as f32,
    }
}

/// Global L2 norm of a gradient buffer (accumulated in f64, deterministic: fixed chunks, each
/// summed in 16 interleaved partial sums so the loop vectorises, then added in order).
pub fn global_norm(grads: &[f32]) -> f64 {
    const LANES: usize = 16;
    let chunk_sum = |c: &[f32]| {
        let mut acc = [0.0f64; LANES];
        let blocks = c.chunks_exact(LANES);
        let rest: f64 = blocks
            .remainder()
            .iter()
            .map(|&x| (x as f64) * (x as f64))
            .sum();
        for b in blocks {
            for l in 0..LANES {
                acc[l] += (b[l] as f64) * (b[l] as f64);
            }
        }
        acc.iter().sum::<f64>() + rest
    };
    grads
        .par_chunks(CHUNK)
        .map(chunk_sum)
        .collect::<Vec<f64>>()
        .iter()
        .sum::<f64>()
        .sqrt()
}

/// Sets a gradient buffer to zero, in parallel (one thread writes at a fraction of the
/// machine's bandwidth).
pub fn zero(grads: &mut [f32]) {
    grads.par_chunks_mut(1 << 16).for_each(|c| c.fill(0.0));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    #[test]
    fn matches_a_hand_computed_adamw_step_and_skips_decay_on_norms() {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let layout = ParamLayout::new(&cfg);
        let mut opt = AdamW::new(AdamWConfig::default(), &layout);
        let mut p = vec![1.0f32; layout.total()];
        let g = vec![0.5f32; layout.total()];
        opt.step(&mut p, &g, 0.01, 1.0);
        // Step 1: m = 0.05, v = 0.0125; mhat = 0.5, vhat = 0.25 -> update = 0.01 * 0.5/0.5.
        let matrix = layout.range(layout.layers[0].wq).start;
        let norm = layout.range(layout.layers[0].attn_norm).start;
        let expect_matrix = 1.0 * (1.0 - 0.01 * 0.1) - 0.01 * (0.5 / (0.5 + 1e-8));
        assert!(
            (p[matrix] as f64 - expect_matrix).abs() < 1e-6,
            "{}",
            p[matrix]
        );
        assert!((p[norm] as f64 - (1.0 - 0.01)).abs() < 1e-6, "{}", p[norm]);
    }

    #[test]
    fn update_scale_averages_then_clips() {
        let g = [6.0f32, 8.0]; // sum of 2 micro-steps: mean gradient (3, 4), norm 5
        let u = update_scale(&g, 2.0, 0.0);
        assert_eq!((u.grad_norm, u.clipped, u.factor), (5.0, false, 0.5));
        let u = update_scale(&g, 2.0, 1.0);
        assert!(u.clipped && (u.factor - 0.1).abs() < 1e-7);
    }

    #[test]
    fn global_norm_is_l2() {
        assert!((global_norm(&[3.0, 4.0]) - 5.0).abs() < 1e-12);
    }
}
