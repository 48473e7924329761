//! The block methods of [`Kernels`](crate::backend::Kernels): their weights, their inputs and
//! what they save. Plain data: the default bodies, which compose the fine-grained operations,
//! are in `kernels.rs` next to the trait (`kernels::sdpa_forward`, ...), so this file sits
//! below the trait and imports only `types.rs`. A backend that overrides a block can still
//! call those defaults (for instance for a case its programs do not cover).
//!
//! Attention block (sdpaFwd), for `rows` token rows:
//! ```text
//! q, k, v = xn Wq^T, xn Wk^T, xn Wv^T          (one call: linear_forward_multi)
//! q, k    = rmsnorm_per_head(q), (k)             (Qwen3 only; q_raw, k_raw saved)
//! q, k    = rope(q), rope(k)
//! att     = causal_attention(q, k, v)            (or against a KV cache when decoding)
//! ```
//! Feed-forward block (ffnFused): `out = residual + W2 (silu(W1 xn) * W3 xn)`.

use half::bf16;

use super::types::{Matrix, ModelDims, Qkv, RopeTable};

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
    /// ([`Kernels::attention_saved_len`](crate::backend::Kernels::attention_saved_len)).
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

/// One layer's key/value cache: `[capacity, kv_dim]` each, in f32 or in bf16 (the keys and
/// values rounded to nearest even when stored: half the bytes a decoded token reads).
#[derive(Debug)]
pub enum KvCache<'a> {
    F32 {
        k: &'a mut [f32],
        v: &'a mut [f32],
    },
    Bf16 {
        k: &'a mut [bf16],
        v: &'a mut [bf16],
    },
}

impl KvCache<'_> {
    /// Positions the cache can hold (`kv_dim` values each).
    pub fn positions(&self, kv_dim: usize) -> usize {
        let len = match self {
            KvCache::F32 { k, v } => k.len().min(v.len()),
            KvCache::Bf16 { k, v } => k.len().min(v.len()),
        };
        len / kv_dim.max(1)
    }

    /// Whether values are rounded to bf16 when stored.
    pub fn is_bf16(&self) -> bool {
        matches!(self, KvCache::Bf16 { .. })
    }

    /// Stores rows of keys and values (`[rows, kv_dim]`) at positions `start..`: copied, or
    /// rounded to bf16.
    pub fn store(&mut self, start: usize, kv_dim: usize, keys: &[f32], values: &[f32]) {
        let (a, b) = (start * kv_dim, start * kv_dim + keys.len());
        match self {
            KvCache::F32 { k, v } => {
                k[a..b].copy_from_slice(keys);
                v[a..b].copy_from_slice(values);
            }
            KvCache::Bf16 { k, v } => {
                for (d, &x) in k[a..b].iter_mut().zip(keys) {
                    *d = bf16::from_f32(x);
                }
                for (d, &x) in v[a..b].iter_mut().zip(values) {
                    *d = bf16::from_f32(x);
                }
            }
        }
    }
}

/// Rounds `xs` to the nearest bf16 values (kept as f32): what a bf16 cache stores, for the
/// rows a prompt attends to before they are read back from the cache.
pub fn round_to_bf16(xs: &mut [f32]) {
    for x in xs {
        *x = bf16::from_f32(*x).to_f32();
    }
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
    /// One new row of each of several sequences (decoding them together): row `i` sits at
    /// position `starts[i]` of its own cache `caches[i]`, which the block extends by one.
    Batched {
        caches: Vec<KvCache<'a>>,
        starts: Vec<usize>,
    },
}

/// The inputs and outputs of [`Kernels::sdpa_forward`](crate::backend::Kernels::sdpa_forward).
pub struct SdpaForward<'a> {
    pub dims: &'a ModelDims,
    /// The normed input `[rows, dim]`.
    pub xn: &'a [f32],
    pub w: &'a AttentionWeights<'a>,
    pub rope: &'a RopeTable,
    pub acts: &'a mut AttentionActs,
    pub attend: Attend<'a>,
    /// Terms added to the projections' outputs right after the products (LoRA's low-rank
    /// updates, computed by the caller); `None` when the model has none.
    pub delta: Option<QkvDelta<'a>>,
}

/// Terms added to the query, key and value projections (`[rows, q_dim]`, `[rows, kv_dim]`),
/// before the q/k norm and RoPE. A projection without one is left as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct QkvDelta<'a> {
    pub q: Option<&'a [f32]>,
    pub k: Option<&'a [f32]>,
    pub v: Option<&'a [f32]>,
}

/// Terms added to the gate and up projections (`[rows, ffn]` each), before SwiGLU.
#[derive(Debug, Clone, Copy, Default)]
pub struct GateUpDelta<'a> {
    pub gate: Option<&'a [f32]>,
    pub up: Option<&'a [f32]>,
}

/// The inputs and outputs of [`Kernels::ffn_forward`](crate::backend::Kernels::ffn_forward).
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
    /// Terms added to the gate and up projections (LoRA); `None` when the model has none.
    pub delta: Option<GateUpDelta<'a>>,
}
