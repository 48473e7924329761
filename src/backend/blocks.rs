//! The block methods of [`Kernels`]: their inputs, what they save, and their default bodies,
//! which compose the fine-grained operations. A backend that overrides a block can still call
//! these functions (for instance for a case its programs do not cover).
//!
//! Attention block (sdpaFwd), for `rows` token rows:
//! ```text
//! q, k, v = xn Wq^T, xn Wk^T, xn Wv^T          (one call: linear_forward_multi)
//! q, k    = rmsnorm_per_head(q), (k)             (Qwen3 only; q_raw, k_raw saved)
//! q, k    = rope(q), rope(k)
//! att     = causal_attention(q, k, v)            (or against a KV cache when decoding)
//! ```
//! Feed-forward block (ffnFused): `out = residual + W2 (silu(W1 xn) * W3 xn)`.

use super::kernels::{Kernels, LinearOut};
use super::types::{
    AttentionShape, CachedAttentionShape, Matrix, ModelDims, Positions, Qkv, RopeTable,
};
use crate::error::{Error, Result};

/// The weights of one attention block (matrices `[out, in]`).
#[derive(Debug, Clone, Copy)]
pub struct AttentionWeights<'a> {
    pub wq: Matrix<'a>,
    pub wk: Matrix<'a>,
    pub wv: Matrix<'a>,
    pub wo: Matrix<'a>,
    /// Per-head RMSNorm gains `[head_dim]` (Qwen3).
    pub q_norm: Option<&'a [f32]>,
    pub k_norm: Option<&'a [f32]>,
}

/// The weights of one feed-forward block.
#[derive(Debug, Clone, Copy)]
pub struct FfnWeights<'a> {
    pub gate: Matrix<'a>,
    pub up: Matrix<'a>,
    pub down: Matrix<'a>,
}

/// What the attention block computes and keeps for its backward pass, for `rows` token rows.
#[derive(Debug)]
pub struct AttentionActs {
    pub rows: usize,
    /// Queries and keys before the per-head norm `[rows, q_dim]`, `[rows, kv_dim]`, and the
    /// `1/rms` of each head (q/k norm only; empty otherwise).
    pub q_raw: Vec<f32>,
    pub k_raw: Vec<f32>,
    pub rstd_q: Vec<f32>,
    pub rstd_k: Vec<f32>,
    /// Queries and keys as attention sees them (normed, rotated), and values.
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// The attention state saved for the backward pass, sized by the backend
    /// ([`Kernels::attention_saved_len`]).
    pub saved: Vec<f32>,
    /// Attention output before `o_proj` `[rows, q_dim]`.
    pub att: Vec<f32>,
}

impl AttentionActs {
    /// Elements of the buffers for `rows` rows and `saved` saved-state elements.
    pub fn elements(dims: &ModelDims, rows: usize, saved: usize) -> usize {
        let (q, kv) = (rows * dims.q_dim(), rows * dims.kv_dim());
        let qk_norm = if dims.qk_norm {
            q + kv + rows * (dims.n_heads + dims.n_kv_heads)
        } else {
            0
        };
        qk_norm + 2 * q + 2 * kv + saved
    }

    /// Zeroed buffers.
    pub fn new(dims: &ModelDims, rows: usize, saved: usize) -> Self {
        let z = |len: usize| vec![0.0f32; len];
        let qk = |len: usize| if dims.qk_norm { z(len) } else { Vec::new() };
        AttentionActs {
            rows,
            q_raw: qk(rows * dims.q_dim()),
            k_raw: qk(rows * dims.kv_dim()),
            rstd_q: qk(rows * dims.n_heads),
            rstd_k: qk(rows * dims.n_kv_heads),
            q: z(rows * dims.q_dim()),
            k: z(rows * dims.kv_dim()),
            v: z(rows * dims.kv_dim()),
            saved: z(saved),
            att: z(rows * dims.q_dim()),
        }
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        [
            &self.q_raw,
            &self.k_raw,
            &self.rstd_q,
            &self.rstd_k,
            &self.q,
            &self.k,
            &self.v,
            &self.saved,
            &self.att,
        ]
        .iter()
        .map(|v| v.len())
        .sum()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The saved queries, keys and values.
    pub fn qkv(&self) -> Qkv<'_> {
        Qkv {
            q: &self.q,
            k: &self.k,
            v: &self.v,
        }
    }
}

/// What the feed-forward block keeps: the gate and up projections and the gated product,
/// each `[rows, ffn]`.
#[derive(Debug)]
pub struct FfnActs {
    pub h1: Vec<f32>,
    pub h3: Vec<f32>,
    pub g: Vec<f32>,
}

impl FfnActs {
    /// Elements of the buffers for `rows` rows.
    pub fn elements(dims: &ModelDims, rows: usize) -> usize {
        3 * rows * dims.ffn_dim
    }

    /// Zeroed buffers.
    pub fn new(dims: &ModelDims, rows: usize) -> Self {
        let n = rows * dims.ffn_dim;
        FfnActs {
            h1: vec![0.0; n],
            h3: vec![0.0; n],
            g: vec![0.0; n],
        }
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        self.h1.len() + self.h3.len() + self.g.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One layer's key/value cache: `[capacity, kv_dim]` each.
#[derive(Debug)]
pub struct KvCache<'a> {
    pub k: &'a mut [f32],
    pub v: &'a mut [f32],
}

/// Which keys and values the attention block attends to.
#[derive(Debug)]
pub enum Attend<'a> {
    /// Causal attention within each of `batch` sequences of `seq` tokens (training, and a
    /// forward pass over whole sequences). Row `i` sits at position `i % seq`.
    Causal { batch: usize, seq: usize },
    /// New rows of one sequence after `start` cached positions (decoding). The block writes
    /// the new keys and values into the cache at `start..start + rows`.
    Cached { cache: KvCache<'a>, start: usize },
}

/// The inputs and outputs of [`Kernels::sdpa_forward`].
pub struct SdpaForward<'a> {
    pub dims: &'a ModelDims,
    /// The normed input `[rows, dim]`.
    pub xn: &'a [f32],
    pub w: &'a AttentionWeights<'a>,
    pub rope: &'a RopeTable,
    pub acts: &'a mut AttentionActs,
    pub attend: Attend<'a>,
}

/// The inputs and outputs of [`Kernels::ffn_forward`].
pub struct FfnForward<'a> {
    /// The normed input `[rows, dim]`.
    pub xn: &'a [f32],
    /// The residual stream the block adds to `[rows, dim]`.
    pub residual: &'a [f32],
    /// `residual + W2 (silu(W1 xn) * W3 xn)` `[rows, dim]`.
    pub out: &'a mut [f32],
    pub w: &'a FfnWeights<'a>,
    pub acts: &'a mut FfnActs,
    pub rows: usize,
}

/// Default body of [`Kernels::sdpa_forward`].
pub fn sdpa_forward<K: Kernels + ?Sized>(k: &K, a: SdpaForward) -> Result<()> {
    let SdpaForward {
        dims,
        xn,
        w,
        rope,
        acts,
        attend,
    } = a;
    let rows = acts.rows;
    let (hd, kvd) = (dims.head_dim, dims.kv_dim());
    let a = acts;
    // Projections (before the q/k norm where there is one).
    let qk_norm = match (w.q_norm, w.k_norm) {
        (Some(qn), Some(kn)) => Some((qn, kn)),
        _ => None,
    };
    {
        let (q_dst, k_dst) = if qk_norm.is_some() {
            (&mut a.q_raw, &mut a.k_raw)
        } else {
            (&mut a.q, &mut a.k)
        };
        let mut outs = [
            LinearOut { y: q_dst, w: w.wq },
            LinearOut { y: k_dst, w: w.wk },
            LinearOut {
                y: &mut a.v,
                w: w.wv,
            },
        ];
        k.linear_forward_multi(xn, rows, &mut outs)?;
    }
    if let Some((qn, kn)) = qk_norm {
        k.rmsnorm_forward(&mut a.q, &mut a.rstd_q, &a.q_raw, qn, hd, dims.norm_eps)?;
        k.rmsnorm_forward(&mut a.k, &mut a.rstd_k, &a.k_raw, kn, hd, dims.norm_eps)?;
    }
    let heads = |batch, seq| AttentionShape {
        batch,
        seq,
        n_heads: dims.n_heads,
        n_kv_heads: dims.n_kv_heads,
        head_dim: hd,
    };
    match attend {
        Attend::Causal { batch, seq } => {
            let pos = Positions {
                first: 0,
                period: seq,
            };
            k.rope_forward(&mut a.q, dims.n_heads, rope, pos)?;
            k.rope_forward(&mut a.k, dims.n_kv_heads, rope, pos)?;
            let qkv = Qkv {
                q: &a.q,
                k: &a.k,
                v: &a.v,
            };
            k.attention_forward(&mut a.att, &mut a.saved, qkv, &heads(batch, seq))
        }
        Attend::Cached { cache, start } => {
            let end = start + rows;
            if cache.k.len() < end * kvd || cache.v.len() < end * kvd {
                return Err(Error::invalid(format!(
                    "the key/value cache holds {} positions, {end} needed",
                    cache.k.len().min(cache.v.len()) / kvd.max(1)
                )));
            }
            let pos = Positions {
                first: start,
                period: rows,
            };
            k.rope_forward(&mut a.q, dims.n_heads, rope, pos)?;
            k.rope_forward(&mut a.k, dims.n_kv_heads, rope, pos)?;
            cache.k[start * kvd..end * kvd].copy_from_slice(&a.k);
            cache.v[start * kvd..end * kvd].copy_from_slice(&a.v);
            let whole = heads(1, rows);
            if start == 0 && rows > 1 && a.saved.len() >= k.attention_saved_len(&whole) {
                // A whole sequence from position 0 (prefill): the batched causal kernel.
                let qkv = Qkv {
                    q: &a.q,
                    k: &a.k,
                    v: &a.v,
                };
                return k.attention_forward(&mut a.att, &mut a.saved, qkv, &whole);
            }
            let s = CachedAttentionShape {
                start,
                rows,
                n_heads: dims.n_heads,
                n_kv_heads: dims.n_kv_heads,
                head_dim: hd,
            };
            k.attention_cached(
                &mut a.att,
                &a.q,
                &cache.k[..end * kvd],
                &cache.v[..end * kvd],
                &s,
            )
        }
    }
}

/// Default body of [`Kernels::wo_forward`].
pub fn wo_forward<K: Kernels + ?Sized>(
    k: &K,
    out: &mut [f32],
    att: &[f32],
    wo: Matrix,
    residual: &[f32],
    rows: usize,
) -> Result<()> {
    k.linear_forward(out, att, wo, rows)?;
    k.residual_add(out, residual)
}

/// Default body of [`Kernels::ffn_forward`].
pub fn ffn_forward<K: Kernels + ?Sized>(k: &K, a: FfnForward) -> Result<()> {
    let FfnForward {
        xn,
        residual,
        out,
        w,
        acts,
        rows,
    } = a;
    {
        let mut outs = [
            LinearOut {
                y: &mut acts.h1,
                w: w.gate,
            },
            LinearOut {
                y: &mut acts.h3,
                w: w.up,
            },
        ];
        k.linear_forward_multi(xn, rows, &mut outs)?;
    }
    k.swiglu_forward(&mut acts.g, &acts.h1, &acts.h3)?;
    k.linear_forward(out, &acts.g, w.down, rows)?;
    k.residual_add(out, residual)
}

/// Default body of [`Kernels::ffn_backward_gate_up`].
pub fn ffn_backward_gate_up<K: Kernels + ?Sized>(
    k: &K,
    dxn: &mut [f32],
    dh1: &[f32],
    dh3: &[f32],
    w: &FfnWeights,
    rows: usize,
) -> Result<()> {
    k.linear_backward_input(dxn, dh1, w.gate.f32, w.gate.linear(rows), false)?;
    k.linear_backward_input(dxn, dh3, w.up.f32, w.up.linear(rows), true)
}
