//! Converting weights between the two RoPE pairings.
//!
//! A model that rotates interleaved pairs `(2j, 2j+1)` (llama2.c, Meta, GGUF Llama) computes
//! exactly the same function as a rotate-half model (`(j, j + head_dim/2)`, Hugging Face) whose
//! query/key projection rows are permuted within each head: rotate-half row `p*half + j` is
//! interleaved row `2j + p`. Qwen3's per-head q/k norm gains are permuted the same way.

use super::config::{ModelConfig, RopeStyle};
use super::params::ParamLayout;

/// Permutes the rows of `w` (`[heads * head_dim, cols]`) from one pairing to the other.
pub fn permute_rows(
    w: &[f32],
    heads: usize,
    head_dim: usize,
    cols: usize,
    to: RopeStyle,
) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0f32; w.len()];
    for h in 0..heads {
        for p in 0..2 {
            for j in 0..half {
                let half_row = h * head_dim + p * half + j;
                let inter_row = h * head_dim + 2 * j + p;
                let (dst, src) = match to {
                    RopeStyle::RotateHalf => (half_row, inter_row),
                    RopeStyle::Interleaved => (inter_row, half_row),
                };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Rewrites `params` (in `layout`) and `cfg` so the model uses the `to` pairing, computing the
/// same function. Does nothing when the model already uses it.
pub fn convert_rope_style(
    cfg: &mut ModelConfig,
    layout: &ParamLayout,
    params: &mut [f32],
    to: RopeStyle,
) {
    if cfg.rope_style == to {
        return;
    }
    let (hd, d) = (cfg.head_dim, cfg.dim);
    for lt in &layout.layers {
        for (id, heads) in [(lt.wq, cfg.n_heads), (lt.wk, cfg.n_kv_heads)] {
            let r = layout.range(id);
            let p = permute_rows(&params[r.clone()], heads, hd, d, to);
            params[r].copy_from_slice(&p);
        }
        for id in [lt.q_norm, lt.k_norm].into_iter().flatten() {
            let r = layout.range(id);
            let p = permute_rows(&params[r.clone()], 1, hd, 1, to);
            params[r].copy_from_slice(&p);
        }
    }
    cfg.rope_style = to;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuKernels;
    use crate::model::{Architecture, Transformer};

    #[test]
    fn both_pairings_compute_the_same_function_after_conversion() {
        for arch in [Architecture::Llama, Architecture::Qwen3] {
            let mut cfg = ModelConfig::preset("tiny").unwrap();
            cfg.arch = arch;
            cfg.rope_style = RopeStyle::Interleaved;
            let a = Transformer::new(cfg.clone());
            let mut params = a.layout.init(cfg.n_layers, 9);
            for (i, p) in params.iter_mut().enumerate() {
                *p *= 4.0 + (i % 3) as f32; // make attention and norm gains matter
            }
            let tokens: Vec<u32> = (0..12).map(|i| (i * 5 % 64) as u32).collect();
            let mut acts = a.activations(&CpuKernels, 1, 12);
            a.forward(&CpuKernels, &params, &mut acts, &tokens).unwrap();
            let reference = acts.logits.clone();

            let mut cfg2 = cfg.clone();
            let mut p2 = params.clone();
            convert_rope_style(&mut cfg2, &a.layout, &mut p2, RopeStyle::RotateHalf);
            assert_eq!(cfg2.rope_style, RopeStyle::RotateHalf);
            assert_ne!(p2, params);
            let b = Transformer::new(cfg2.clone());
            b.forward(&CpuKernels, &p2, &mut acts, &tokens).unwrap();
            let worst = reference
                .iter()
                .zip(&acts.logits)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            let scale = reference.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            assert!(
                scale > 1.0 && worst < 1e-5 * scale,
                "{arch:?}: {worst} of {scale}"
            );
            // And back again, exactly.
            convert_rope_style(&mut cfg2, &a.layout, &mut p2, RopeStyle::Interleaved);
            assert_eq!(p2, params);
        }
    }
}
