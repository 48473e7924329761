//! The [`Kernels`] interface: everything a training step or a forward pass computes, in two
//! grains.
//!
//! * **Operations** (`linear_forward`, `rmsnorm_backward`, `attention_forward`, ...): one
//!   kernel each, the CPU's unit of work.
//! * **Blocks** (`sdpa_forward`, `wo_forward`, `ffn_forward`, `ffn_backward_down`,
//!   `ffn_backward_gate_up`, `wo_backward`, `sdpa_backward`, `q_backward`, `kv_backward`): the
//!   original system's ten accelerator kernels (ARCHITECTURE.md has the table), over the
//!   types of `backend::blocks`. Their default bodies compose the operations (the functions
//!   at the end of this file), so the CPU runs exactly the operations it always ran, and an
//!   accelerator overrides a whole block.
//!
//! Every method returns a [`Result`]: a backend whose program fails to compile or evaluate
//! reports it, and the error reaches the user. Lifecycle: [`Kernels::prepare`] is called once
//! per model and batch shape before the first step, so a backend compiles its programs and
//! allocates its buffers up front and fails there, not in the middle of a run. Saved state:
//! [`Kernels::attention_saved_len`] sizes what the attention block keeps between forward and
//! backward (the CPU keeps the probabilities; a backend that recomputes them keeps less).
//!
//! All tensors are row-major f32 slices; shapes are documented on the CPU functions each
//! default calls (`backend::cpu`).

use half::bf16;

use super::blocks::{
    Attend, AttentionActs, AttentionWeights, FfnForward, FfnWeights, KvCache, SdpaForward,
    round_to_bf16,
};
use super::cpu::attention;
use super::cpu::embedding;
use super::cpu::linear;
use super::cpu::loss;
use super::cpu::residual;
use super::cpu::rmsnorm;
use super::cpu::rope;
use super::cpu::swiglu;
use super::types::{
    AttentionShape, CachedAttentionShape, LinearShape, Matrix, NormSaved, Positions, Qkv, QkvGrads,
    RopeTable, StepShape, WeightFormat,
};
use crate::error::{Error, Result};

/// One output of [`Kernels::linear_forward_multi`]: `y [rows, w.rows] = x w^T`.
pub struct LinearOut<'a> {
    pub y: &'a mut [f32],
    pub w: Matrix<'a>,
}

/// What an accelerator did since it was last asked ([`Kernels::take_accelerator_stats`]): a
/// step event reports it per optimizer update, so the time of the kernels themselves can be
/// told from the CPU's work around them.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AcceleratorStats {
    /// Time in the accelerator's programs (the device's evaluations, or the simulator's runs).
    pub kernel_ms: f64,
    /// Time writing their input surfaces and reading their outputs (f32 <-> fp16 packing).
    pub staging_ms: f64,
    /// Bytes written into input surfaces.
    pub bytes_staged: u64,
    /// Of which weights (written once per optimizer update when the caller tracks its weights).
    pub weight_bytes_staged: u64,
    /// Program evaluations.
    pub calls: u64,
}

/// Where one of the original's ten kernels runs (`on`: the backend's name, or `cpu` with the
/// reason).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KernelPlacement {
    pub kernel: String,
    pub on: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// How closely a backend matches the reference kernels, as the conformance suite checks it:
/// the largest absolute difference of any output element, divided by the largest absolute
/// reference value of that output, must not exceed `rel`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    pub rel: f64,
}

impl Tolerance {
    /// f32 arithmetic in another order (blocked GEMMs, vectorised sums).
    pub const FP32: Tolerance = Tolerance { rel: 1e-5 };
    /// bf16-rounded operands with f32 accumulation (8 significant bits per operand).
    pub const BF16: Tolerance = Tolerance { rel: 2e-2 };
    /// Every intermediate rounded to fp16 (unit roundoff u = 2^-11 = 4.9e-4), fp32
    /// accumulation inside products and sums. The longest chain, sdpaFwd (inputs, projection,
    /// q/k norm, RoPE, scores, scale, mask, softmax, P V, each rounded), takes about 20
    /// roundings, so its error stays within 20 u = 1e-2 of the largest value.
    pub const FP16: Tolerance = Tolerance { rel: 1e-2 };
}

/// The operations and blocks of a transformer step. See the module documentation.
pub trait Kernels: Send + Sync {
    // ---- lifecycle -------------------------------------------------------------------

    /// Prepares for steps of one shape: compiles programs, allocates buffers. Called once
    /// before the first step; an error here stops a run before anything is written.
    fn prepare(&mut self, shape: &StepShape) -> Result<()> {
        let _ = shape;
        Ok(())
    }

    /// Elements of the attention state [`Kernels::attention_forward`] saves for
    /// [`Kernels::attention_backward`] (`AttentionActs::saved`). The CPU saves the
    /// probabilities `[batch, heads, seq, seq]`.
    fn attention_saved_len(&self, shape: &AttentionShape) -> usize {
        shape.probs_len()
    }

    /// How closely this backend matches the reference kernels (checked by
    /// `backend::conformance`).
    fn tolerance(&self) -> Tolerance {
        Tolerance::FP32
    }

    /// Where the original's ten kernels run after `prepare` (empty: all on this backend's own
    /// kernels, as on the CPU).
    fn placement(&self) -> Vec<KernelPlacement> {
        Vec::new()
    }

    /// The caller tracks its weights: it calls [`Kernels::weights_changed`] whenever they
    /// change. Until then a backend that copies weights (the Neural Engine's surfaces) copies
    /// them on every call. Idempotent.
    fn track_weights(&self) {}

    /// The weights the next calls read are not those of the previous calls (after an optimizer
    /// update): a backend keeping copies writes them again, once.
    fn weights_changed(&self) {}

    /// What an accelerator did since the last call of this method (`None` on the CPU).
    fn take_accelerator_stats(&self) -> Option<AcceleratorStats> {
        None
    }

    /// Bytes this backend allocates for steps of `shape` besides the activations (packing
    /// buffers, device surfaces), for the memory check made before a run starts. The CPU's
    /// products pack one depth block (1024) of their widest operand, and each thread a panel.
    fn workspace_bytes(&self, shape: &StepShape) -> usize {
        let d = &shape.dims;
        let widest = shape.vocab_out.max(d.ffn_dim).max(d.q_dim()).max(d.dim);
        4 * 1024 * widest + rayon::current_num_threads() * 4 * 256 * 1024
    }

    // ---- what this backend can do -----------------------------------------------------

    /// Whether small gradients vanish in these kernels' products without loss scaling (fp16
    /// kernels): `--loss-scale auto` then scales dynamically.
    fn needs_loss_scaling(&self) -> bool {
        false
    }

    /// Whether these kernels read the matrices in `format` when decoding (the compact copy
    /// the caller keeps): fp32 and bf16 everywhere, int8 only where the int8 products are
    /// (the CPU's).
    fn reads_weights(&self, format: WeightFormat) -> bool {
        format != WeightFormat::Q8
    }

    /// Whether every matrix product runs on the CPU's own kernels, in the backend's
    /// precision, so that the CPU's measured peak is their limit (benchmarks report the
    /// fraction).
    fn products_on_cpu(&self) -> bool {
        false
    }

    /// Things the user should know about the prepared kernels (e.g. hardware rules their
    /// programs break), said once after `prepare`.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }

    // ---- operations ------------------------------------------------------------------

    /// `out [n, dim] = table[ids]`.
    fn embedding_forward(
        &self,
        out: &mut [f32],
        table: &[f32],
        ids: &[u32],
        dim: usize,
    ) -> Result<()> {
        embedding::embedding_forward(out, table, ids, dim);
        Ok(())
    }

    /// `dtable[ids] += dout`.
    fn embedding_backward(
        &self,
        dtable: &mut [f32],
        dout: &[f32],
        ids: &[u32],
        dim: usize,
    ) -> Result<()> {
        embedding::embedding_backward(dtable, dout, ids, dim);
        Ok(())
    }

    /// Row-wise RMSNorm; saves `1/rms` per row.
    fn rmsnorm_forward(
        &self,
        out: &mut [f32],
        rstd: &mut [f32],
        x: &[f32],
        w: &[f32],
        d: usize,
        eps: f32,
    ) -> Result<()> {
        rmsnorm::rmsnorm_forward(out, rstd, x, w, d, eps);
        Ok(())
    }

    /// Gradients of RMSNorm: the input's overwritten (or added when `accumulate`), the gain's
    /// accumulated.
    fn rmsnorm_backward(
        &self,
        dx: &mut [f32],
        dw: &mut [f32],
        dy: &[f32],
        saved: NormSaved,
        d: usize,
        accumulate: bool,
    ) -> Result<()> {
        rmsnorm::rmsnorm_backward(dx, dw, dy, saved, d, accumulate);
        Ok(())
    }

    /// RoPE in place on `x [rows, heads * head_dim]`.
    fn rope_forward(
        &self,
        x: &mut [f32],
        heads: usize,
        rope: &RopeTable,
        pos: Positions,
    ) -> Result<()> {
        rope::rope_forward(x, heads, rope, pos);
        Ok(())
    }

    /// RoPE backward (the inverse rotation) in place.
    fn rope_backward(
        &self,
        dx: &mut [f32],
        heads: usize,
        rope: &RopeTable,
        pos: Positions,
    ) -> Result<()> {
        rope::rope_backward(dx, heads, rope, pos);
        Ok(())
    }

    /// Residual add in place: `acc += x`.
    fn residual_add(&self, acc: &mut [f32], x: &[f32]) -> Result<()> {
        residual::residual_add(acc, x);
        Ok(())
    }

    /// `g = silu(h1) * h3`.
    fn swiglu_forward(&self, g: &mut [f32], h1: &[f32], h3: &[f32]) -> Result<()> {
        swiglu::swiglu_forward(g, h1, h3);
        Ok(())
    }

    /// Gradients of the SwiGLU gate (overwritten).
    fn swiglu_backward(
        &self,
        dh1: &mut [f32],
        dh3: &mut [f32],
        dg: &[f32],
        h1: &[f32],
        h3: &[f32],
    ) -> Result<()> {
        swiglu::swiglu_backward(dh1, dh3, dg, h1, h3);
        Ok(())
    }

    /// `y [rows, w.rows] = x [rows, w.cols] w^T`.
    fn linear_forward(&self, y: &mut [f32], x: &[f32], w: Matrix, rows: usize) -> Result<()> {
        linear::linear_forward(y, x, w.f32, w.linear(rows));
        Ok(())
    }

    /// Several products of the same input (the q, k and v projections; gate and up).
    fn linear_forward_multi(&self, x: &[f32], rows: usize, outs: &mut [LinearOut]) -> Result<()> {
        for o in outs.iter_mut() {
            self.linear_forward(o.y, x, o.w, rows)?;
        }
        Ok(())
    }

    /// `dx [rows, d_in] (+)= dy [rows, d_out] W`, `W [d_out, d_in]`.
    fn linear_backward_input(
        &self,
        dx: &mut [f32],
        dy: &[f32],
        w: &[f32],
        s: LinearShape,
        accumulate: bool,
    ) -> Result<()> {
        linear::linear_backward_input(dx, dy, w, s, accumulate);
        Ok(())
    }

    /// `dW [d_out, d_in] += dy^T x`.
    fn linear_backward_weight(
        &self,
        dw: &mut [f32],
        dy: &[f32],
        x: &[f32],
        s: LinearShape,
    ) -> Result<()> {
        linear::linear_backward_weight(dw, dy, x, s);
        Ok(())
    }

    /// Causal GQA attention; fills the saved state (`attention_saved_len` elements).
    fn attention_forward(
        &self,
        out: &mut [f32],
        saved: &mut [f32],
        x: Qkv,
        s: &AttentionShape,
    ) -> Result<()> {
        attention::attention_forward(out, saved, x, s);
        Ok(())
    }

    /// Gradients of causal GQA attention with respect to q, k and v (overwritten).
    fn attention_backward(
        &self,
        g: QkvGrads,
        dout: &[f32],
        saved: &[f32],
        x: Qkv,
        s: &AttentionShape,
    ) -> Result<()> {
        attention::attention_backward(g, dout, saved, x, s);
        Ok(())
    }

    /// New query rows against a key/value cache (decoding); nothing is saved.
    fn attention_cached(
        &self,
        out: &mut [f32],
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        s: &CachedAttentionShape,
    ) -> Result<()> {
        attention::attention_cached(out, q, k_cache, v_cache, s);
        Ok(())
    }

    /// [`Kernels::attention_cached`] against a cache held in bf16 (the CPU reads it as bf16:
    /// half the bytes; the scores and sums stay f32).
    fn attention_cached_bf16(
        &self,
        out: &mut [f32],
        q: &[f32],
        k_cache: &[bf16],
        v_cache: &[bf16],
        s: &CachedAttentionShape,
    ) -> Result<()> {
        attention::attention_cached_bf16(out, q, k_cache, v_cache, s);
        Ok(())
    }

    /// Sum of the cross-entropy losses of the rows of `logits [rows, vocab]`.
    fn cross_entropy_loss(&self, logits: &[f32], targets: &[u32], vocab: usize) -> Result<f64> {
        Ok(loss::cross_entropy_loss(logits, targets, vocab))
    }

    /// Loss sum, and `logits` replaced by `scale * dloss/dlogits`.
    fn cross_entropy_forward_backward(
        &self,
        logits: &mut [f32],
        targets: &[u32],
        vocab: usize,
        scale: f32,
    ) -> Result<f64> {
        Ok(loss::cross_entropy_forward_backward(
            logits, targets, vocab, scale,
        ))
    }

    // ---- blocks (the original's accelerator kernels) ------------------------------------

    /// sdpaFwd: q/k/v projections of the normed input, Qwen3's q/k norm, RoPE and causal
    /// attention; saves q, k, v (the "taps") and the attention state.
    fn sdpa_forward(&self, a: SdpaForward) -> Result<()> {
        sdpa_forward(self, a)
    }

    /// woFwd: `out [rows, dim] = residual + att Wo^T`.
    fn wo_forward(
        &self,
        out: &mut [f32],
        att: &[f32],
        wo: Matrix,
        residual: &[f32],
        rows: usize,
    ) -> Result<()> {
        wo_forward(self, out, att, wo, residual, rows)
    }

    /// ffnFused: `out = residual + W2 (silu(W1 xn) * W3 xn)`; saves h1, h3 and the gate.
    fn ffn_forward(&self, a: FfnForward) -> Result<()> {
        ffn_forward(self, a)
    }

    /// ffnBwdW2t: `dg [rows, ffn] = dy W2`.
    fn ffn_backward_down(
        &self,
        dg: &mut [f32],
        dy: &[f32],
        down: Matrix,
        rows: usize,
    ) -> Result<()> {
        self.linear_backward_input(dg, dy, down.f32, down.linear(rows), false)
    }

    /// ffnBwdW13t: `dxn [rows, dim] = dh1 W1 + dh3 W3`.
    fn ffn_backward_gate_up(
        &self,
        dxn: &mut [f32],
        dh1: &[f32],
        dh3: &[f32],
        w: &FfnWeights,
        rows: usize,
    ) -> Result<()> {
        ffn_backward_gate_up(self, dxn, dh1, dh3, w, rows)
    }

    /// wotBwd: `datt [rows, q_dim] = dy Wo`.
    fn wo_backward(&self, datt: &mut [f32], dy: &[f32], wo: Matrix, rows: usize) -> Result<()> {
        self.linear_backward_input(datt, dy, wo.f32, wo.linear(rows), false)
    }

    /// sdpaBwd1 + sdpaBwd2: gradients of the attention core with respect to the rotated q, k
    /// and v, from the saved taps and state.
    fn sdpa_backward(
        &self,
        g: QkvGrads,
        datt: &[f32],
        acts: &AttentionActs,
        s: &AttentionShape,
    ) -> Result<()> {
        self.attention_backward(g, datt, &acts.saved, acts.qkv(), s)
    }

    /// qBwd: `dxn [rows, dim] = dq Wq`.
    fn q_backward(&self, dxn: &mut [f32], dq: &[f32], wq: Matrix, rows: usize) -> Result<()> {
        self.linear_backward_input(dxn, dq, wq.f32, wq.linear(rows), false)
    }

    /// kvBwd: `dxn += dk Wk + dv Wv`.
    fn kv_backward(
        &self,
        dxn: &mut [f32],
        dk: &[f32],
        dv: &[f32],
        w: &AttentionWeights,
        rows: usize,
    ) -> Result<()> {
        self.linear_backward_input(dxn, dk, w.wk.f32, w.wk.linear(rows), true)?;
        self.linear_backward_input(dxn, dv, w.wv.f32, w.wv.linear(rows), true)
    }
}

// ---- default bodies of the blocks ------------------------------------------------------
//
// The blocks' compositions of the operations, generic over the kernels so that a backend
// overriding a block can still run the default for a case its programs do not cover.

/// Default body of [`Kernels::sdpa_forward`].
pub fn sdpa_forward<K: Kernels + ?Sized>(k: &K, a: SdpaForward) -> Result<()> {
    let SdpaForward {
        dims,
        xn,
        w,
        rope,
        acts,
        attend,
        delta,
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
        if let Some(d) = delta {
            for (o, add) in outs.iter_mut().zip([d.q, d.k, d.v]) {
                if let Some(add) = add {
                    k.residual_add(o.y, add)?;
                }
            }
        }
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
        Attend::Cached { mut cache, start } => {
            let end = start + rows;
            if cache.positions(kvd) < end {
                return Err(Error::invalid(format!(
                    "the key/value cache holds {} positions, {end} needed",
                    cache.positions(kvd)
                )));
            }
            let pos = Positions {
                first: start,
                period: rows,
            };
            k.rope_forward(&mut a.q, dims.n_heads, rope, pos)?;
            k.rope_forward(&mut a.k, dims.n_kv_heads, rope, pos)?;
            if cache.is_bf16() {
                // The prompt's own attention reads what the cache will hold.
                round_to_bf16(&mut a.k);
                round_to_bf16(&mut a.v);
            }
            cache.store(start, kvd, &a.k, &a.v);
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
            attend_cache(k, &mut a.att, &a.q, &cache, end * kvd, &s)
        }
        Attend::Batched { caches, starts } => {
            if caches.len() != rows || starts.len() != rows {
                return Err(Error::invalid(format!(
                    "{rows} rows decoded together need a cache and a position each, got {} and {}",
                    caches.len(),
                    starts.len()
                )));
            }
            let qd = dims.n_heads * hd;
            for (i, (mut cache, &start)) in caches.into_iter().zip(&starts).enumerate() {
                let end = start + 1;
                if cache.positions(kvd) < end {
                    return Err(Error::invalid(format!(
                        "the key/value cache of row {i} holds {} positions, {end} needed",
                        cache.positions(kvd)
                    )));
                }
                let pos = Positions {
                    first: start,
                    period: 1,
                };
                let q = &mut a.q[i * qd..(i + 1) * qd];
                let kr = &mut a.k[i * kvd..(i + 1) * kvd];
                k.rope_forward(q, dims.n_heads, rope, pos)?;
                k.rope_forward(kr, dims.n_kv_heads, rope, pos)?;
                cache.store(start, kvd, kr, &a.v[i * kvd..(i + 1) * kvd]);
                let s = CachedAttentionShape {
                    start,
                    rows: 1,
                    n_heads: dims.n_heads,
                    n_kv_heads: dims.n_kv_heads,
                    head_dim: hd,
                };
                attend_cache(
                    k,
                    &mut a.att[i * qd..(i + 1) * qd],
                    &a.q[i * qd..(i + 1) * qd],
                    &cache,
                    end * kvd,
                    &s,
                )?;
            }
            Ok(())
        }
    }
}

/// Cached attention over the first `len` values of `cache`'s keys and values, in its format.
fn attend_cache<K: Kernels + ?Sized>(
    k: &K,
    out: &mut [f32],
    q: &[f32],
    cache: &KvCache,
    len: usize,
    s: &CachedAttentionShape,
) -> Result<()> {
    match cache {
        KvCache::F32 { k: kc, v: vc } => k.attention_cached(out, q, &kc[..len], &vc[..len], s),
        KvCache::Bf16 { k: kc, v: vc } => {
            k.attention_cached_bf16(out, q, &kc[..len], &vc[..len], s)
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
        delta,
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
    if let Some(d) = delta {
        if let Some(add) = d.gate {
            k.residual_add(&mut acts.h1, add)?;
        }
        if let Some(add) = d.up {
            k.residual_add(&mut acts.h3, add)?;
        }
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
