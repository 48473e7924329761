//! Causal scaled-dot-product attention with grouped-query heads (GQA).
//!
//! Head mapping (Hugging Face convention, the same in forward and backward): query head `h`
//! reads key/value head `h / (n_heads / n_kv_heads)`.

use rayon::prelude::*;

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

/// Backward. Shapes as in [`attention_forward`]; `dout [batch*seq, n_heads*head_dim]` ->
/// `dq` (same shape as `q`), `dk`, `dv` (same shape as `k`), all overwritten.
///
/// Per query head: `dP = dO V^T`, `dV += P^T dO`, `dS = P * (dP - rowsum(P * dP)) / sqrt(hd)`,
/// `dQ = dS K`, `dK += dS^T Q`; the key/value gradients of a group sum over its query heads.
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
