//! Saved activations and backward scratch for one batch shape, allocated once up front.
//!
//! The attention state saved between forward and backward is sized by the backend
//! ([`crate::backend::Kernels::attention_saved_len`]): the CPU keeps the probabilities, a
//! backend that recomputes them keeps less.

use super::config::ModelConfig;
use crate::backend::{AttentionActs, FfnActs, ModelDims};

/// What one layer saves in the forward pass for its backward pass, for `rows` token rows.
#[derive(Debug)]
pub struct LayerActivations {
    /// Attention RMSNorm output `[rows, dim]` and its `1/rms` `[rows]`.
    pub xn1: Vec<f32>,
    pub rstd1: Vec<f32>,
    /// The attention block's taps and saved state.
    pub attn: AttentionActs,
    /// Residual stream after the attention block `[rows, dim]`.
    pub x_mid: Vec<f32>,
    /// FFN RMSNorm output `[rows, dim]` and its `1/rms` `[rows]`.
    pub xn2: Vec<f32>,
    pub rstd2: Vec<f32>,
    /// The feed-forward block's taps.
    pub ffn: FfnActs,
}

impl LayerActivations {
    /// Elements of one layer's buffers.
    pub fn elements(dims: &ModelDims, rows: usize, saved: usize) -> usize {
        3 * rows * dims.dim + 2 * rows // xn1, x_mid, xn2; rstd1, rstd2
            + AttentionActs::elements(dims, rows, saved)
            + FfnActs::elements(dims, rows)
    }

    /// Zeroed buffers for `rows` rows and `saved` elements of attention state.
    pub fn new(dims: &ModelDims, rows: usize, saved: usize) -> Self {
        let z = |len: usize| vec![0.0f32; len];
        LayerActivations {
            xn1: z(rows * dims.dim),
            rstd1: z(rows),
            attn: AttentionActs::new(dims, rows, saved),
            x_mid: z(rows * dims.dim),
            xn2: z(rows * dims.dim),
            rstd2: z(rows),
            ffn: FfnActs::new(dims, rows),
        }
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        self.xn1.len()
            + self.rstd1.len()
            + self.attn.len()
            + self.x_mid.len()
            + self.xn2.len()
            + self.rstd2.len()
            + self.ffn.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// All activation memory for a batch of `batch` sequences of `seq` tokens and a classifier of
/// `vocab_out` rows (the full vocabulary or a compacted one).
#[derive(Debug)]
pub struct Activations {
    pub batch: usize,
    pub seq: usize,
    pub vocab_out: usize,
    /// Residual stream at the input of each layer, and after the last one: `L + 1` x `[n, dim]`.
    pub xs: Vec<Vec<f32>>,
    pub layers: Vec<LayerActivations>,
    /// Final norm output `[n, dim]` and its `1/rms`.
    pub xnf: Vec<f32>,
    pub rstdf: Vec<f32>,
    /// Logits `[n, vocab_out]`; after the backward pass, their gradient.
    pub logits: Vec<f32>,
    /// Gathered classifier rows and their gradient `[vocab_out, dim]` (compacted vocab only).
    pub cls_w: Vec<f32>,
    pub cls_dw: Vec<f32>,
    // Backward scratch.
    pub dx: Vec<f32>,
    pub dxn: Vec<f32>,
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
    pub datt: Vec<f32>,
    pub dk_raw: Vec<f32>,
    pub dg: Vec<f32>,
    pub dh1: Vec<f32>,
    pub dh3: Vec<f32>,
    /// Classifier targets mapped into the output rows `[n]`.
    pub targets: Vec<u32>,
    /// Time spent per kernel family (accumulates until reset).
    pub timings: super::timing::StepTimings,
    /// What LoRA adapters keep, when the model runs with adapters
    /// ([`crate::model::Transformer::activations_adapted`]).
    pub lora: Option<super::lora_pass::LoraActs>,
}

/// The element counts of every buffer, in one place so that [`Activations::bytes_needed`] and
/// [`Activations::new`] cannot disagree.
struct Sizes {
    dims: ModelDims,
    n: usize,
    saved: usize,
    vocab_out: usize,
    compacted: bool,
}

impl Sizes {
    fn new(cfg: &ModelConfig, batch: usize, seq: usize, vocab_out: usize, saved: usize) -> Self {
        Sizes {
            dims: cfg.dims(),
            n: batch * seq,
            saved,
            vocab_out,
            compacted: vocab_out != cfg.vocab_size,
        }
    }

    fn scratch(&self) -> usize {
        let (n, d) = (self.n, &self.dims);
        2 * n * d.dim // dx, dxn
            + 2 * n * d.q_dim() + 2 * n * d.kv_dim() // dq, datt, dk, dv
            + if d.qk_norm { n * d.kv_dim() } else { 0 } // dk_raw
            + 3 * n * d.ffn_dim // dg, dh1, dh3
    }

    fn total(&self) -> usize {
        let (n, d) = (self.n, &self.dims);
        let cls = if self.compacted {
            2 * self.vocab_out * d.dim
        } else {
            0
        };
        (d.n_layers + 1) * n * d.dim
            + d.n_layers * LayerActivations::elements(d, n, self.saved)
            + n * d.dim + n // xnf, rstdf
            + n * self.vocab_out
            + cls
            + self.scratch()
            + n // targets
    }
}

impl Activations {
    /// Bytes needed for a batch shape with `saved` elements of attention state per layer,
    /// computed without allocating.
    pub fn bytes_needed(
        cfg: &ModelConfig,
        batch: usize,
        seq: usize,
        vocab_out: usize,
        saved: usize,
    ) -> usize {
        Sizes::new(cfg, batch, seq, vocab_out, saved).total() * 4
    }

    /// Allocates everything for a batch shape.
    pub fn new(
        cfg: &ModelConfig,
        batch: usize,
        seq: usize,
        vocab_out: usize,
        saved: usize,
    ) -> Self {
        let s = Sizes::new(cfg, batch, seq, vocab_out, saved);
        let (n, d) = (s.n, s.dims);
        let z = |len: usize| vec![0.0f32; len];
        let opt = |on: bool, len: usize| if on { vec![0.0f32; len] } else { Vec::new() };
        Activations {
            batch,
            seq,
            vocab_out,
            xs: (0..=d.n_layers).map(|_| z(n * d.dim)).collect(),
            layers: (0..d.n_layers)
                .map(|_| LayerActivations::new(&d, n, saved))
                .collect(),
            xnf: z(n * d.dim),
            rstdf: z(n),
            logits: z(n * vocab_out),
            cls_w: opt(s.compacted, vocab_out * d.dim),
            cls_dw: opt(s.compacted, vocab_out * d.dim),
            dx: z(n * d.dim),
            dxn: z(n * d.dim),
            dq: z(n * d.q_dim()),
            dk: z(n * d.kv_dim()),
            dv: z(n * d.kv_dim()),
            datt: z(n * d.q_dim()),
            dk_raw: opt(d.qk_norm, n * d.kv_dim()),
            dg: z(n * d.ffn_dim),
            dh1: z(n * d.ffn_dim),
            dh3: z(n * d.ffn_dim),
            targets: vec![0; n],
            timings: Default::default(),
            lora: None,
        }
    }

    /// Bytes held by this set of buffers.
    pub fn bytes(&self) -> usize {
        let layers: usize = self.layers.iter().map(LayerActivations::len).sum();
        let rest: usize = self.xs.iter().map(Vec::len).sum::<usize>()
            + [
                &self.xnf,
                &self.rstdf,
                &self.logits,
                &self.cls_w,
                &self.cls_dw,
                &self.dx,
                &self.dxn,
                &self.dq,
                &self.dk,
                &self.dv,
                &self.datt,
                &self.dk_raw,
                &self.dg,
                &self.dh1,
                &self.dh3,
            ]
            .iter()
            .map(|v| v.len())
            .sum::<usize>()
            + self.targets.len();
        (layers + rest) * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn computed_size_matches_allocation() {
        for name in ["tiny", "stories260k"] {
            let mut cfg = ModelConfig::preset(name).unwrap();
            for arch in [
                super::super::config::Architecture::Llama,
                super::super::config::Architecture::Qwen3,
            ] {
                cfg.arch = arch;
                for (vocab_out, saved) in [(cfg.vocab_size, 0), (17, 2 * 4 * 25)] {
                    let a = Activations::new(&cfg, 2, 5, vocab_out, saved);
                    assert_eq!(
                        a.bytes(),
                        Activations::bytes_needed(&cfg, 2, 5, vocab_out, saved)
                    );
                }
            }
        }
    }
}
