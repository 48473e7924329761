//! The types every backend works with: the dimensions of a model and of a step, the shapes of
//! single calls, weight matrices, token positions and RoPE tables. They belong to no backend,
//! so the model layer builds them and every backend (CPU, an accelerator, its simulator) reads
//! the same values.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeStyle {
    /// Hugging Face convention: dimension `i` is paired with `i + head_dim/2`.
    RotateHalf,
    /// llama2.c / Meta convention: dimensions `2i` and `2i+1` form a pair.
    Interleaved,
}

/// A target id that takes no part in the loss (a prompt token of a chat example, padding):
/// its row adds nothing to the loss and gets a zero gradient.
pub const IGNORE_TARGET: u32 = u32::MAX;

/// The dimensions of a transformer, as kernels see them (the model's `ModelConfig` without its
/// file-format details).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelDims {
    /// Width of the residual stream.
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// SwiGLU hidden width.
    pub ffn_dim: usize,
    pub vocab_size: usize,
    pub max_seq_len: usize,
    pub norm_eps: f32,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
    pub rope_theta: f64,
    pub rope_style: RopeStyle,
}

impl ModelDims {
    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// What a backend prepares for: one model and one batch shape of training (or of a batched
/// forward pass). [`crate::backend::Kernels::prepare`] receives it once, before any step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepShape {
    pub dims: ModelDims,
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Rows of the classifier (the vocabulary, or a compacted one).
    pub vocab_out: usize,
}

impl StepShape {
    /// Token rows of one micro-batch.
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }

    /// The shape of the attention calls of this step.
    pub fn attention(&self) -> AttentionShape {
        AttentionShape {
            batch: self.batch,
            seq: self.seq,
            n_heads: self.dims.n_heads,
            n_kv_heads: self.dims.n_kv_heads,
            head_dim: self.dims.head_dim,
        }
    }
}

/// Shapes of one causal attention call over `batch` sequences of `seq` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    /// Width of all query heads.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    /// Width of all key (or value) heads.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
    /// Token rows.
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }
    /// Elements of the full probability tensor `[batch, n_heads, seq, seq]`.
    pub fn probs_len(&self) -> usize {
        self.batch * self.n_heads * self.seq * self.seq
    }
    /// The softmax scale `1/sqrt(head_dim)`.
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// Attention of new query rows against a key/value cache (decoding): `rows` new tokens at
/// positions `start..start + rows` of one sequence; the cache holds positions
/// `0..start + rows` (the new keys and values already written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedAttentionShape {
    pub start: usize,
    pub rows: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl CachedAttentionShape {
    /// The same heads as an [`AttentionShape`] of one sequence of `rows` tokens.
    pub fn heads(&self) -> AttentionShape {
        AttentionShape {
            batch: 1,
            seq: self.rows,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }
}

/// The sizes of one linear layer applied to `rows` token rows: `y [rows, d_out] = x [rows,
/// d_in] W^T` with `W [d_out, d_in]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearShape {
    pub rows: usize,
    pub d_in: usize,
    pub d_out: usize,
}

/// A weight matrix `[rows, cols]` (row-major, `[out, in]` as in PyTorch): the f32 master copy,
/// and a compact copy when the caller keeps one for inference (`generate --weights bf16|q8`).
/// A kernel that reads the compact copy computes with those weights.
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a> {
    pub f32: &'a [f32],
    pub compact: Option<CompactWeights<'a>>,
    pub rows: usize,
    pub cols: usize,
}

/// A compact copy of a weight matrix, with the layout of its f32 master.
#[derive(Debug, Clone, Copy)]
pub enum CompactWeights<'a> {
    /// bf16 bits, read by matrix-vector products (decoding one token).
    Bf16(&'a [u16]),
    /// Int8 in groups along each row with one f32 scale per group, read by every forward
    /// product of the CPU kernels.
    Q8(Q8Matrix<'a>),
}

/// A view of int8 weights `[rows, cols]`, row-major, in groups of `group` values along each
/// row (`cols` a multiple of `group`) with one f32 scale per group; `cpu::quant` makes and
/// multiplies them.
#[derive(Debug, Clone, Copy)]
pub struct Q8Matrix<'a> {
    pub q: &'a [i8],
    pub scales: &'a [f32],
    pub group: usize,
    /// Where the owner keeps the same weights rearranged for the CPU's products of several
    /// token rows ([`Q8Packed`]), made by the first such product; `None` when it keeps none.
    pub packed: Option<&'a OnceLock<Q8Packed>>,
}

/// Int8 weights `[rows, cols]` rearranged for `vpdpbusd` (AVX512-VNNI), which multiplies
/// unsigned by signed bytes and sums each four adjacent products into one of 16 int32 lanes:
/// blocks of 16 rows (the last padded with zero weights), and within a block, for each step of
/// 4 columns, 64 bytes holding rows `0..16` x those 4 columns, each weight stored as the
/// unsigned byte `w + 128` (the activations are the signed operand, and the product's excess
/// `128 * sum(x)` is subtracted once per group). `cpu::gemm_q8` makes and multiplies them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Q8Packed {
    /// `[blocks][cols / 4][16 rows][4 columns]` unsigned bytes.
    pub bytes: Vec<u8>,
    /// `[blocks][cols / group][16 rows]` scales (0 for padding rows).
    pub scales: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
}

impl<'a> Matrix<'a> {
    /// An f32 matrix.
    pub fn new(f32: &'a [f32], rows: usize, cols: usize) -> Self {
        Matrix {
            f32,
            compact: None,
            rows,
            cols,
        }
    }

    /// The shape of this matrix as a linear layer over `rows` token rows.
    pub fn linear(&self, rows: usize) -> LinearShape {
        LinearShape {
            rows,
            d_in: self.cols,
            d_out: self.rows,
        }
    }
}

/// Positions of token rows: row `i` sits at `first + i % period` (a batch of sequences of
/// length `T` starting at 0: `first = 0, period = T`; new tokens after a cache of `start`
/// positions: `first = start, period = rows`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Positions {
    pub first: usize,
    pub period: usize,
}

impl Positions {
    /// Position of row `i`.
    #[inline]
    pub fn of(&self, i: usize) -> usize {
        self.first + i % self.period.max(1)
    }
}

/// Precomputed `cos`/`sin` of `pos * theta^(-2j/head_dim)`, shape `[max_pos, head_dim/2]`,
/// with the pairing convention. Every backend rotates with these same values.
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

    /// The table of a model.
    pub fn for_model(dims: &ModelDims) -> Self {
        Self::new(
            dims.head_dim,
            dims.max_seq_len,
            dims.rope_theta,
            dims.rope_style,
        )
    }

    /// Positions covered by the table.
    pub fn max_pos(&self) -> usize {
        self.cos.len() / (self.head_dim / 2).max(1)
    }

    /// `cos` of the `head_dim/2` angles of a position.
    #[inline]
    pub fn cos(&self, pos: usize) -> &[f32] {
        let half = self.head_dim / 2;
        &self.cos[pos * half..(pos + 1) * half]
    }

    /// `sin` of the `head_dim/2` angles of a position.
    #[inline]
    pub fn sin(&self, pos: usize) -> &[f32] {
        let half = self.head_dim / 2;
        &self.sin[pos * half..(pos + 1) * half]
    }
}

/// The queries, keys and values of an attention call: `q [rows, n_heads * head_dim]`,
/// `k, v [rows, n_kv_heads * head_dim]`.
#[derive(Debug, Clone, Copy)]
pub struct Qkv<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
}

/// Gradients with respect to the queries, keys and values (shapes as [`Qkv`]).
#[derive(Debug)]
pub struct QkvGrads<'a> {
    pub dq: &'a mut [f32],
    pub dk: &'a mut [f32],
    pub dv: &'a mut [f32],
}

/// What an RMSNorm backward reads from its forward: the input `x [rows, d]`, the gain
/// `w [d]` and the saved `rstd [rows]`.
#[derive(Debug, Clone, Copy)]
pub struct NormSaved<'a> {
    pub x: &'a [f32],
    pub w: &'a [f32],
    pub rstd: &'a [f32],
}

/// The weights streamed for each decoded token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// The f32 parameters.
    #[default]
    #[value(alias = "f32")]
    Fp32,
    /// A bf16 copy: half the bytes per token (products still accumulate in f32).
    Bf16,
    /// Int8 matrices in groups of up to 64 with f32 scales (Q8_0, as llama2.c's runq.c), and
    /// activations quantised per group at run time: about a quarter of the bytes per token.
    /// Every forward product, prompt included, uses the int8 weights.
    #[value(alias = "int8")]
    Q8,
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightFormat::Fp32 => "fp32",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Q8 => "q8",
        })
    }
}
