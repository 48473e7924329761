//! Saved activations and backward scratch for one batch shape, allocated once up front.

use super::config::ModelConfig;

/// What one layer saves in the forward pass for its backward pass.
#[derive(Debug)]
pub struct LayerActivations {
    /// Attention RMSNorm output `[n, dim]` and its `1/rms` `[n]`.
    pub xn1: Vec<f32>,
    pub rstd1: Vec<f32>,
    /// Queries/keys before the per-head norm `[n, q_dim]`/`[n, kv_dim]` (Qwen3 only, else empty).
    pub q_raw: Vec<f32>,
    pub k_raw: Vec<f32>,
    /// `1/rms` of each query / key head `[n * heads]` (Qwen3 only).
    pub rstd_q: Vec<f32>,
    pub rstd_k: Vec<f32>,
    /// Queries and keys as attention sees them (normed, rotated), values. `[n, q_dim]`, `[n, kv_dim]`.
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// Attention probabilities `[batch, heads, seq, seq]`.
    pub probs: Vec<f32>,
    /// Attention output before `o_proj` `[n, q_dim]`.
    pub att: Vec<f32>,
    /// Residual stream after the attention block `[n, dim]`.
    pub x_mid: Vec<f32>,
    /// FFN RMSNorm output `[n, dim]` and its `1/rms` `[n]`.
    pub xn2: Vec<f32>,
    pub rstd2: Vec<f32>,
    /// Gate and up projections `[n, ffn]`, and the gated product `[n, ffn]`.
    pub h1: Vec<f32>,
    pub h3: Vec<f32>,
    pub g: Vec<f32>,
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
    pub tmp: Vec<f32>,
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
}

/// The element counts of every buffer, in one place so that [`Activations::bytes_needed`] and
/// [`Activations::new`] cannot disagree.
struct Sizes {
    n: usize,
    dim: usize,
    q: usize,
    kv: usize,
    ffn: usize,
    probs: usize,
    qk_norm: bool,
    heads: usize,
    kv_heads: usize,
    layers: usize,
    vocab_out: usize,
    compacted: bool,
}

impl Sizes {
    fn new(cfg: &ModelConfig, batch: usize, seq: usize, vocab_out: usize) -> Self {
        let n = batch * seq;
        Sizes {
            n,
            dim: cfg.dim,
            q: cfg.q_dim(),
            kv: cfg.kv_dim(),
            ffn: cfg.ffn_dim,
            probs: batch * cfg.n_heads * seq * seq,
            qk_norm: cfg.qk_norm(),
            heads: cfg.n_heads,
            kv_heads: cfg.n_kv_heads,
            layers: cfg.n_layers,
            vocab_out,
            compacted: vocab_out != cfg.vocab_size,
        }
    }

    fn per_layer(&self) -> usize {
        let n = self.n;
        let qk = if self.qk_norm {
            n * self.q + n * self.kv + n * self.heads + n * self.kv_heads
        } else {
            0
        };
        2 * n * self.dim + 2 * n // xn1, xn2, rstd1, rstd2
            + qk
            + n * self.q * 2 + n * self.kv * 2 // q, att, k, v
            + self.probs
            + n * self.dim // x_mid
            + 3 * n * self.ffn
    }

    fn total(&self) -> usize {
        let n = self.n;
        let cls = if self.compacted {
            2 * self.vocab_out * self.dim
        } else {
            0
        };
        let scratch = 3 * n * self.dim // dx, dxn, tmp
            + 2 * n * self.q + 2 * n * self.kv // dq, datt, dk, dv
            + if self.qk_norm { n * self.kv } else { 0 }
            + 3 * n * self.ffn;
        (self.layers + 1) * n * self.dim
            + self.layers * self.per_layer()
            + n * self.dim + n // xnf, rstdf
            + n * self.vocab_out
            + cls
            + scratch
            + n // targets
    }
}

impl Activations {
    /// Bytes needed for a batch shape, computed without allocating.
    pub fn bytes_needed(cfg: &ModelConfig, batch: usize, seq: usize, vocab_out: usize) -> usize {
        Sizes::new(cfg, batch, seq, vocab_out).total() * 4
    }

    /// Allocates everything for a batch shape.
    pub fn new(cfg: &ModelConfig, batch: usize, seq: usize, vocab_out: usize) -> Self {
        let s = Sizes::new(cfg, batch, seq, vocab_out);
        let n = s.n;
        let z = |len: usize| vec![0.0f32; len];
        let opt = |on: bool, len: usize| if on { vec![0.0f32; len] } else { Vec::new() };
        let layers = (0..s.layers)
            .map(|_| LayerActivations {
                xn1: z(n * s.dim),
                rstd1: z(n),
                q_raw: opt(s.qk_norm, n * s.q),
                k_raw: opt(s.qk_norm, n * s.kv),
                rstd_q: opt(s.qk_norm, n * s.heads),
                rstd_k: opt(s.qk_norm, n * s.kv_heads),
                q: z(n * s.q),
                k: z(n * s.kv),
                v: z(n * s.kv),
                probs: z(s.probs),
                att: z(n * s.q),
                x_mid: z(n * s.dim),
                xn2: z(n * s.dim),
                rstd2: z(n),
                h1: z(n * s.ffn),
                h3: z(n * s.ffn),
                g: z(n * s.ffn),
            })
            .collect();
        Activations {
            batch,
            seq,
            vocab_out,
            xs: (0..=s.layers).map(|_| z(n * s.dim)).collect(),
            layers,
            xnf: z(n * s.dim),
            rstdf: z(n),
            logits: z(n * vocab_out),
            cls_w: opt(s.compacted, vocab_out * s.dim),
            cls_dw: opt(s.compacted, vocab_out * s.dim),
            dx: z(n * s.dim),
            dxn: z(n * s.dim),
            tmp: z(n * s.dim),
            dq: z(n * s.q),
            dk: z(n * s.kv),
            dv: z(n * s.kv),
            datt: z(n * s.q),
            dk_raw: opt(s.qk_norm, n * s.kv),
            dg: z(n * s.ffn),
            dh1: z(n * s.ffn),
            dh3: z(n * s.ffn),
            targets: vec![0; n],
            timings: Default::default(),
        }
    }

    /// Bytes held by this set of buffers.
    pub fn bytes(&self) -> usize {
        let layer_bytes: usize = self
            .layers
            .iter()
            .map(|l| {
                [
                    &l.xn1, &l.rstd1, &l.q_raw, &l.k_raw, &l.rstd_q, &l.rstd_k, &l.q, &l.k, &l.v,
                    &l.probs, &l.att, &l.x_mid, &l.xn2, &l.rstd2, &l.h1, &l.h3, &l.g,
                ]
                .iter()
                .map(|v| v.len())
                .sum::<usize>()
            })
            .sum();
        let rest: usize = self.xs.iter().map(Vec::len).sum::<usize>()
            + [
                &self.xnf,
                &self.rstdf,
                &self.logits,
                &self.cls_w,
                &self.cls_dw,
                &self.dx,
                &self.dxn,
                &self.tmp,
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
        (layer_bytes + rest) * 4
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
                for vocab_out in [cfg.vocab_size, 17] {
                    let a = Activations::new(&cfg, 2, 5, vocab_out);
                    assert_eq!(a.bytes(), Activations::bytes_needed(&cfg, 2, 5, vocab_out));
                }
            }
        }
    }
}
