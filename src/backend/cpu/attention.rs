//! Causal scaled-dot-product attention with grouped-query heads (GQA).
//!
//! Head mapping (Hugging Face convention, the same in forward and backward): query head `h`
//! reads key/value head `h / (n_heads / n_kv_heads)`.
//!
//! The fast path runs every head's products (`Q K^T`, `P V`, and the four backward products)
//! as matrix multiplies on strided views of the activations, one head per task, and skips the
//! masked upper triangle block by block (about half the work). The reference path is plain
//! loops; tests check one against the other.

use std::cell::RefCell;

use rayon::prelude::*;

use super::SendPtr;
use super::gemm_bf16::{MatRef, gemm_bf16_serial_raw};
use super::linear::gemm_strided;

/// One strided product of a head: f32 through the `gemm` crate, or bf16 products through
/// [`gemm_bf16_serial_raw`]. Arguments as [`gemm_strided`].
///
/// # Safety
/// As [`gemm_strided`].
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn mm(
    bf16: bool,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    scale: f32,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
) {
    // fp32 heads stay on the `gemm` crate: measured faster than packing these small blocks.
    if !bf16 {
        // SAFETY: forwarded.
        unsafe {
            gemm_strided(
                m, n, k, dst, dst_rs, accumulate, scale, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs,
            )
        };
        return;
    }
    debug_assert_eq!(scale, 1.0);
    if m == 0 || n == 0 || k == 0 {
        // SAFETY: forwarded (gemm_strided handles the empty cases).
        unsafe {
            gemm_strided(
                m, n, k, dst, dst_rs, accumulate, scale, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs,
            )
        };
        return;
    }
    // SAFETY: the caller guarantees these element ranges are live and not written during the
    // call (they are inputs), so shared slices over them are sound.
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(lhs, (m - 1) * lhs_rs + (k - 1) * lhs_cs + 1),
            std::slice::from_raw_parts(rhs, (k - 1) * rhs_rs + (n - 1) * rhs_cs + 1),
        )
    };
    let a = MatRef {
        data: a,
        rs: lhs_rs,
        cs: lhs_cs,
    };
    let b = MatRef {
        data: b,
        rs: rhs_rs,
        cs: rhs_cs,
    };
    // SAFETY: forwarded from the caller's contract on `dst`.
    unsafe { gemm_bf16_serial_raw(m, n, k, a, b, dst, dst_rs, accumulate) };
}

/// Rows per causal block: blocks above the diagonal are skipped.
const BLOCK: usize = 64;

thread_local! {
    /// Per-thread `[seq, seq]` scratch for the backward pass, reused across calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Softmax of row `t` of a causal score matrix in place over columns `0..=t`; zeroes the rest.
#[inline]
fn causal_softmax_row(row: &mut [f32], t: usize, scale: f32) {
    let (live, masked) = row.split_at_mut(t + 1);
    let max = super::math::max(live);
    let sum = super::math::exp_scaled_shift_sum(live, max, scale);
    let inv = 1.0 / sum;
    for x in live.iter_mut() {
        *x *= inv;
    }
    masked.fill(0.0);
}

/// Forward. Shapes: `q [batch*seq, n_heads*head_dim]`, `k, v [batch*seq, n_kv_heads*head_dim]`
/// -> `out [batch*seq, n_heads*head_dim]`, `probs [batch, n_heads, seq, seq]` (softmax of
/// `q k^T / sqrt(head_dim)` with the causal mask; entries above the diagonal are 0), saved for
/// the backward pass.
pub fn attention_forward(
    out: &mut [f32],
    probs: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: &AttentionShape,
) {
    forward_impl(false, out, probs, q, k, v, s)
}

/// [`attention_forward`] with bf16 products (f32 accumulation, f32 softmax); needs
/// AVX512_BF16 (see `gemm_bf16::available`).
pub fn attention_forward_bf16(
    out: &mut [f32],
    probs: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: &AttentionShape,
) {
    forward_impl(true, out, probs, q, k, v, s)
}

fn forward_impl(
    bf16: bool,
    out: &mut [f32],
    probs: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: &AttentionShape,
) {
    let (t_len, hd, qd, kvd) = (s.seq, s.head_dim, s.q_dim(), s.kv_dim());
    let n = s.batch * t_len;
    assert!(q.len() >= n * qd && out.len() >= n * qd && k.len() >= n * kvd && v.len() >= n * kvd);
    assert!(probs.len() >= s.probs_len());
    let scale = s.scale();
    let out_ptr = SendPtr(out.as_mut_ptr());
    probs[..s.probs_len()]
        .par_chunks_mut(t_len * t_len)
        .enumerate()
        .for_each(|(bh, p)| {
            let (b, h) = (bh / s.n_heads, bh % s.n_heads);
            let kvh = h / s.group();
            let qh = &q[b * t_len * qd + h * hd..];
            let kh = &k[b * t_len * kvd + kvh * hd..];
            let vh = &v[b * t_len * kvd + kvh * hd..];
            for r0 in (0..t_len).step_by(BLOCK) {
                let r1 = (r0 + BLOCK).min(t_len);
                let rows = r1 - r0;
                // S[r0..r1, 0..r1] = Q[r0..r1] K[0..r1]^T (scaled inside the softmax)
                // SAFETY: Q rows r0..r1 (stride qd, hd columns) lie in `q`; K rows 0..r1 lie in
                // `k` (checked by the asserts); the destination rows lie in this task's chunk.
                unsafe {
                    mm(
                        bf16,
                        rows,
                        r1,
                        hd,
                        p.as_mut_ptr().add(r0 * t_len),
                        t_len,
                        false,
                        1.0,
                        qh.as_ptr().add(r0 * qd),
                        qd,
                        1,
                        kh.as_ptr(),
                        1,
                        kvd,
                    );
                }
                for t in r0..r1 {
                    causal_softmax_row(&mut p[t * t_len..(t + 1) * t_len], t, scale);
                }
                // O[r0..r1] = P[r0..r1, 0..r1] V[0..r1]
                // SAFETY: the destination is rows r0..r1 of head h in `out` (stride qd, hd
                // columns), written by this task only (one task per (batch, head)); V rows
                // 0..r1 lie in `v`.
                unsafe {
                    mm(
                        bf16,
                        rows,
                        hd,
                        r1,
                        out_ptr.get().add((b * t_len + r0) * qd + h * hd),
                        qd,
                        false,
                        1.0,
                        p.as_ptr().add(r0 * t_len),
                        t_len,
                        1,
                        vh.as_ptr(),
                        kvd,
                        1,
                    );
                }
            }
        });
}

/// Backward. Shapes as in [`attention_forward`]; `dout [batch*seq, n_heads*head_dim]` ->
/// `dq` (same shape as `q`), `dk`, `dv` (same shape as `k`), all overwritten.
///
/// Per query head: `dP = dO V^T`, `dV += P^T dO`, `dS = P * (dP - rowsum(P * dP)) / sqrt(hd)`,
/// `dQ = dS K`, `dK += dS^T Q`; one task per (batch, key/value head) sums its group.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    probs: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: &AttentionShape,
) {
    backward_impl(false, dq, dk, dv, dout, probs, q, k, v, s)
}

/// [`attention_backward`] with bf16 products (f32 accumulation).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_bf16(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    probs: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: &AttentionShape,
) {
    backward_impl(true, dq, dk, dv, dout, probs, q, k, v, s)
}

#[allow(clippy::too_many_arguments)]
fn backward_impl(
    bf16: bool,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    probs: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: &AttentionShape,
) {
    let (t_len, hd, qd, kvd, group) = (s.seq, s.head_dim, s.q_dim(), s.kv_dim(), s.group());
    let n = s.batch * t_len;
    assert!(q.len() >= n * qd && dq.len() >= n * qd && dout.len() >= n * qd);
    assert!(k.len() >= n * kvd && v.len() >= n * kvd && dk.len() >= n * kvd && dv.len() >= n * kvd);
    assert!(probs.len() >= s.probs_len());
    let scale = s.scale();
    let (dq_ptr, dk_ptr, dv_ptr) = (
        SendPtr(dq.as_mut_ptr()),
        SendPtr(dk.as_mut_ptr()),
        SendPtr(dv.as_mut_ptr()),
    );
    (0..s.batch * s.n_kv_heads).into_par_iter().for_each(|bk| {
        let (b, kvh) = (bk / s.n_kv_heads, bk % s.n_kv_heads);
        let kh = &k[b * t_len * kvd + kvh * hd..];
        let vh = &v[b * t_len * kvd + kvh * hd..];
        // SAFETY (for every write below): this task owns key/value head `kvh` of sequence `b`
        // in `dk`/`dv` and query heads `kvh*group..(kvh+1)*group` of sequence `b` in `dq`;
        // no other task touches those elements. All reads stay inside the asserted lengths.
        let dk_h = unsafe { dk_ptr.get().add(b * t_len * kvd + kvh * hd) };
        let dv_h = unsafe { dv_ptr.get().add(b * t_len * kvd + kvh * hd) };
        SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            if scratch.len() < t_len * t_len {
                scratch.resize(t_len * t_len, 0.0);
            }
            let ds = &mut scratch[..t_len * t_len];
            for g in 0..group {
                let h = kvh * group + g;
                let first = g == 0;
                let p = &probs[(b * s.n_heads + h) * t_len * t_len..][..t_len * t_len];
                let doh = &dout[b * t_len * qd + h * hd..];
                let qh = &q[b * t_len * qd + h * hd..];
                for r0 in (0..t_len).step_by(BLOCK) {
                    let r1 = (r0 + BLOCK).min(t_len);
                    let rows = r1 - r0;
                    // dP[r0..r1, 0..r1] = dO[r0..r1] V[0..r1]^T
                    unsafe {
                        mm(
                            bf16,
                            rows,
                            r1,
                            hd,
                            ds.as_mut_ptr().add(r0 * t_len),
                            t_len,
                            false,
                            1.0,
                            doh.as_ptr().add(r0 * qd),
                            qd,
                            1,
                            vh.as_ptr(),
                            1,
                            kvd,
                        );
                    }
                    // dS = P * (dP - rowsum(P * dP)) * scale, zero above the diagonal.
                    for t in r0..r1 {
                        let prow = &p[t * t_len..t * t_len + t + 1];
                        let drow = &mut ds[t * t_len..(t + 1) * t_len];
                        let dot = super::math::dot(prow, drow);
                        for (d, &pv) in drow.iter_mut().zip(prow) {
                            *d = pv * (*d - dot) * scale;
                        }
                        drow[t + 1..].fill(0.0);
                    }
                    // dQ[r0..r1] = dS[r0..r1, 0..r1] K[0..r1]
                    unsafe {
                        mm(
                            bf16,
                            rows,
                            hd,
                            r1,
                            dq_ptr.get().add((b * t_len + r0) * qd + h * hd),
                            qd,
                            false,
                            1.0,
                            ds.as_ptr().add(r0 * t_len),
                            t_len,
                            1,
                            kh.as_ptr(),
                            kvd,
                            1,
                        );
                    }
                }
                // dV[j] (+)= sum_{t>=j} P[t, j] dO[t];  dK[j] (+)= sum_{t>=j} dS[t, j] Q[t]
                for r0 in (0..t_len).step_by(BLOCK) {
                    let r1 = (r0 + BLOCK).min(t_len);
                    let rows = r1 - r0;
                    let span = t_len - r0;
                    // SAFETY: see the task-ownership note above; all operands are in bounds.
                    unsafe {
                        mm(
                            bf16,
                            rows,
                            hd,
                            span,
                            dv_h.add(r0 * kvd),
                            kvd,
                            !first,
                            1.0,
                            p.as_ptr().add(r0 * t_len + r0),
                            1,
                            t_len,
                            doh.as_ptr().add(r0 * qd),
                            qd,
                            1,
                        );
                        mm(
                            bf16,
                            rows,
                            hd,
                            span,
                            dk_h.add(r0 * kvd),
                            kvd,
                            !first,
                            1.0,
                            ds.as_ptr().add(r0 * t_len + r0),
                            1,
                            t_len,
                            qh.as_ptr().add(r0 * qd),
                            qd,
                            1,
                        );
                    }
                }
            }
        });
    });
}

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
    /// Elements of the saved probabilities `[batch, n_heads, seq, seq]`.
    pub fn probs_len(&self) -> usize {
        self.batch * self.n_heads * self.seq * self.seq
    }
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums let the compiler vectorise without reassociating.
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[inline]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Reference forward (simple loops), kept to test the fast path against. Shapes:
/// `q [batch*seq, n_heads*head_dim]`, `k, v [batch*seq, n_kv_heads*head_dim]`
/// -> `out [batch*seq, n_heads*head_dim]`, `probs [batch, n_heads, seq, seq]` (softmax of
/// `q k^T / sqrt(head_dim)` with the causal mask; entries above the diagonal are 0), saved for
/// the backward pass.
pub fn attention_forward_reference(
    out: &mut [f32],
    probs: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: &AttentionShape,
) {
    let (t_len, hd, qd, kvd) = (s.seq, s.head_dim, s.q_dim(), s.kv_dim());
    let scale = s.scale();
    let heads: Vec<Vec<f32>> = probs
        .par_chunks_mut(t_len * t_len)
        .enumerate()
        .map(|(bh, p)| {
            let (b, h) = (bh / s.n_heads, bh % s.n_heads);
            let kvh = h / s.group();
            let mut o = vec![0.0f32; t_len * hd];
            for t in 0..t_len {
                let qrow = &q[(b * t_len + t) * qd + h * hd..][..hd];
                let prow = &mut p[t * t_len..(t + 1) * t_len];
                let mut max = f32::NEG_INFINITY;
                for j in 0..=t {
                    let krow = &k[(b * t_len + j) * kvd + kvh * hd..][..hd];
                    let sc = dot(qrow, krow) * scale;
                    prow[j] = sc;
                    max = max.max(sc);
                }
                let mut sum = 0.0f32;
                for x in &mut prow[..=t] {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                for x in &mut prow[..=t] {
                    *x *= inv;
                }
                prow[t + 1..].fill(0.0);
                let orow = &mut o[t * hd..(t + 1) * hd];
                for j in 0..=t {
                    let vrow = &v[(b * t_len + j) * kvd + kvh * hd..][..hd];
                    axpy(orow, prow[j], vrow);
                }
            }
            o
        })
        .collect();
    for (bh, o) in heads.iter().enumerate() {
        let (b, h) = (bh / s.n_heads, bh % s.n_heads);
        for t in 0..t_len {
            out[(b * t_len + t) * qd + h * hd..][..hd].copy_from_slice(&o[t * hd..(t + 1) * hd]);
        }
    }
}

/// Reference backward (simple loops). Shapes as in [`attention_forward`]; `dout [batch*seq, n_heads*head_dim]` ->
/// `dq` (same shape as `q`), `dk`, `dv` (same shape as `k`), all overwritten.
///
/// Per query head: `dP = dO V^T`, `dV += P^T dO`, `dS = P * (dP - rowsum(P * dP)) / sqrt(hd)`,
/// `dQ = dS K`, `dK += dS^T Q`; the key/value gradients of a group sum over its query heads.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_reference(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    probs: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: &AttentionShape,
) {
    let (t_len, hd, qd, kvd, group) = (s.seq, s.head_dim, s.q_dim(), s.kv_dim(), s.group());
    let scale = s.scale();
    // One task per (batch, kv head): it owns that head's dK/dV and its group's dQ.
    let results: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..s.batch * s.n_kv_heads)
        .into_par_iter()
        .map(|bk| {
            let (b, kvh) = (bk / s.n_kv_heads, bk % s.n_kv_heads);
            let mut dq_g = vec![0.0f32; group * t_len * hd];
            let mut dk_h = vec![0.0f32; t_len * hd];
            let mut dv_h = vec![0.0f32; t_len * hd];
            let mut dp = vec![0.0f32; t_len];
            for g in 0..group {
                let h = kvh * group + g;
                let p = &probs[(b * s.n_heads + h) * t_len * t_len..][..t_len * t_len];
                for t in 0..t_len {
                    let prow = &p[t * t_len..(t + 1) * t_len];
                    let dorow = &dout[(b * t_len + t) * qd + h * hd..][..hd];
                    let qrow = &q[(b * t_len + t) * qd + h * hd..][..hd];
                    let mut rowsum = 0.0f32;
                    for j in 0..=t {
                        let vrow = &v[(b * t_len + j) * kvd + kvh * hd..][..hd];
                        dp[j] = dot(dorow, vrow);
                        rowsum += prow[j] * dp[j];
                        axpy(&mut dv_h[j * hd..(j + 1) * hd], prow[j], dorow);
                    }
                    let dqrow = &mut dq_g[(g * t_len + t) * hd..][..hd];
                    for j in 0..=t {
                        let ds = prow[j] * (dp[j] - rowsum) * scale;
                        let krow = &k[(b * t_len + j) * kvd + kvh * hd..][..hd];
                        axpy(dqrow, ds, krow);
                        axpy(&mut dk_h[j * hd..(j + 1) * hd], ds, qrow);
                    }
                }
            }
            (dq_g, dk_h, dv_h)
        })
        .collect();
    for (bk, (dq_g, dk_h, dv_h)) in results.iter().enumerate() {
        let (b, kvh) = (bk / s.n_kv_heads, bk % s.n_kv_heads);
        for t in 0..t_len {
            let row = b * t_len + t;
            dk[row * kvd + kvh * hd..][..hd].copy_from_slice(&dk_h[t * hd..(t + 1) * hd]);
            dv[row * kvd + kvh * hd..][..hd].copy_from_slice(&dv_h[t * hd..(t + 1) * hd]);
            for g in 0..group {
                let h = kvh * group + g;
                dq[row * qd + h * hd..][..hd].copy_from_slice(&dq_g[(g * t_len + t) * hd..][..hd]);
            }
        }
    }
}
