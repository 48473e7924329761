//! Incremental decoding with a key/value cache: one token at a time, each step attending to the
//! cached keys and values of all earlier positions (GQA: query head `h` reads cached head
//! `h / (heads / kv_heads)`, as in training).

use crate::backend::Kernels;
use crate::backend::cpu::embedding::embedding_forward;
use crate::backend::cpu::gemv::{gemv_bf16, gemv_f32, to_bf16};
use crate::backend::cpu::math::dot;
use crate::backend::cpu::rope::rope_forward;
use crate::error::{Error, Result};
use crate::model::{TensorId, Transformer};

/// `y = W x` for consecutive matrices stacked along rows, starting at `first` and covering
/// `rows` rows of `cols` columns of the flat buffer (one parallel pass for several outputs).
fn matvec_stacked(
    params: &[f32],
    bf16: Option<&[u16]>,
    start: usize,
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let r = start..start + rows * cols;
    match bf16 {
        Some(b) => gemv_bf16(y, &b[r], x, rows, cols),
        None => gemv_f32(y, &params[r], x, rows, cols),
    }
}

/// `y = W x` for the matrix `id`, from the f32 parameters or their bf16 copy.
fn matvec(
    params: &[f32],
    bf16: Option<&[u16]>,
    model: &Transformer,
    id: TensorId,
    x: &[f32],
    y: &mut [f32],
) {
    let t = &model.layout.tensors[id];
    let (rows, cols) = (t.shape[0], t.shape[1]);
    match bf16 {
        Some(b) => gemv_bf16(y, &b[t.range()], x, rows, cols),
        None => gemv_f32(y, &params[t.range()], x, rows, cols),
    }
}

/// Per-layer key/value cache plus decoding scratch buffers.
pub struct Decoder<'m> {
    model: &'m Transformer,
    params: &'m [f32],
    /// bf16 copy of the parameters for the matrix-vector products, when enabled.
    bf16: Option<Vec<u16>>,
    /// `[layers][capacity, kv_dim]`.
    k_cache: Vec<Vec<f32>>,
    v_cache: Vec<Vec<f32>>,
    capacity: usize,
    pos: usize,
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    q_raw: Vec<f32>,
    k_raw: Vec<f32>,
    att: Vec<f32>,
    /// Per-head attention scores `[heads, capacity]`.
    scores: Vec<f32>,
    /// Output of the stacked q/k/v (or gate/up) projection.
    qkv: Vec<f32>,
    h1: Vec<f32>,
    h3: Vec<f32>,
    g: Vec<f32>,
    tmp: Vec<f32>,
    rstd: Vec<f32>,
    logits: Vec<f32>,
}

impl<'m> Decoder<'m> {
    /// A decoder for up to `capacity` positions (at most the model's maximum).
    pub fn new(model: &'m Transformer, params: &'m [f32], capacity: usize) -> Result<Self> {
        let c = &model.cfg;
        if params.len() != model.layout.total() {
            return Err(Error::invalid("parameter buffer does not match the model"));
        }
        let capacity = capacity.min(c.max_seq_len).max(1);
        let z = |n: usize| vec![0.0f32; n];
        Ok(Decoder {
            model,
            params,
            bf16: None,
            k_cache: (0..c.n_layers).map(|_| z(capacity * c.kv_dim())).collect(),
            v_cache: (0..c.n_layers).map(|_| z(capacity * c.kv_dim())).collect(),
            capacity,
            pos: 0,
            x: z(c.dim),
            xn: z(c.dim),
            q: z(c.q_dim()),
            q_raw: z(c.q_dim()),
            k_raw: z(c.kv_dim()),
            att: z(c.q_dim()),
            scores: z(c.n_heads * capacity),
            qkv: z((c.q_dim() + 2 * c.kv_dim()).max(2 * c.ffn_dim)),
            h1: z(c.ffn_dim),
            h3: z(c.ffn_dim),
            g: z(c.ffn_dim),
            tmp: z(c.dim),
            rstd: z(c.n_heads.max(c.n_kv_heads).max(1)),
            logits: z(c.vocab_size),
        })
    }

    /// Streams bf16 copies of the weight matrices in the per-token products (half the memory
    /// traffic; f32 accumulation). Prefill keeps using the f32 weights.
    pub fn with_bf16_weights(mut self) -> Self {
        self.bf16 = Some(to_bf16(self.params));
        self
    }

    /// Bytes of weights read per decoded token (every matrix once).
    pub fn weight_bytes_per_token(&self) -> usize {
        let per = if self.bf16.is_some() { 2 } else { 4 };
        self.model.cfg.matmul_params() * per
    }

    /// Feeds several tokens at once (a batched forward pass through matrix multiplies, which
    /// is far faster than token by token), filling the cache; returns the logits after the
    /// last one.
    pub fn prefill(&mut self, k: &dyn Kernels, tokens: &[u32]) -> Result<&[f32]> {
        if tokens.is_empty() {
            return Err(Error::invalid("nothing to prefill"));
        }
        if self.pos > 0 || tokens.len() == 1 {
            for &t in tokens {
                self.step(k, t)?;
            }
            return Ok(&self.logits);
        }
        if tokens.len() > self.capacity {
            return Err(Error::invalid(format!(
                "{} tokens do not fit the context of {} positions",
                tokens.len(),
                self.capacity
            )));
        }
        let m = self.model;
        let len = tokens.len();
        let mut acts = m.activations(1, len);
        m.forward(k, self.params, &mut acts, tokens)?;
        let kvd = m.cfg.kv_dim();
        for (l, la) in acts.layers.iter().enumerate() {
            self.k_cache[l][..len * kvd].copy_from_slice(&la.k[..len * kvd]);
            self.v_cache[l][..len * kvd].copy_from_slice(&la.v[..len * kvd]);
        }
        let last = &acts.logits[(len - 1) * acts.vocab_out..len * acts.vocab_out];
        match &m.compaction {
            None => self.logits.copy_from_slice(last),
            Some(c) => {
                self.logits.fill(f32::NEG_INFINITY);
                for (&id, &v) in c.kept.iter().zip(last) {
                    self.logits[id as usize] = v;
                }
            }
        }
        self.pos = len;
        Ok(&self.logits)
    }

    /// Positions decoded so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets the cache.
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Feeds one token at the next position and returns the logits over the full vocabulary
    /// for the token that follows it.
    pub fn step(&mut self, k: &dyn Kernels, token: u32) -> Result<&[f32]> {
        let m = self.model;
        let c = &m.cfg;
        let lay = &m.layout;
        if token as usize >= c.vocab_size {
            return Err(Error::invalid(format!(
                "token {token} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        if self.pos >= self.capacity {
            return Err(Error::invalid(format!(
                "context is full ({} positions)",
                self.capacity
            )));
        }
        let (d, kvd, hd) = (c.dim, c.kv_dim(), c.head_dim);
        let eps = c.norm_eps as f32;
        let pos = self.pos;
        let p = self.params;
        let w = |id| lay.view(p, id);
        let b16 = self.bf16.as_deref();
        embedding_forward(&mut self.x, w(lay.embed), &[token], d);
        let scale = 1.0 / (hd as f32).sqrt();
        let group = c.group_size();
        for (l, lt) in lay.layers.iter().enumerate() {
            k.rmsnorm_forward(
                &mut self.xn,
                &mut self.rstd[..1],
                &self.x,
                w(lt.attn_norm),
                d,
                eps,
            );
            let k_row = &mut self.k_cache[l][pos * kvd..(pos + 1) * kvd];
            let v_row = &mut self.v_cache[l][pos * kvd..(pos + 1) * kvd];
            // q, k and v projections in one pass: the three matrices are consecutive.
            let (qd, f) = (c.q_dim(), c.ffn_dim);
            let fused_qkv = lay.range(lt.wq).end == lay.range(lt.wk).start
                && lay.range(lt.wk).end == lay.range(lt.wv).start;
            if fused_qkv {
                let qkv = &mut self.qkv[..qd + 2 * kvd];
                matvec_stacked(
                    p,
                    b16,
                    lay.range(lt.wq).start,
                    qd + 2 * kvd,
                    d,
                    &self.xn,
                    qkv,
                );
                v_row.copy_from_slice(&qkv[qd + kvd..]);
                if lt.q_norm.is_some() {
                    self.q_raw.copy_from_slice(&qkv[..qd]);
                    self.k_raw.copy_from_slice(&qkv[qd..qd + kvd]);
                } else {
                    self.q.copy_from_slice(&qkv[..qd]);
                    k_row.copy_from_slice(&qkv[qd..qd + kvd]);
                }
            }
            if let (Some(qn), Some(kn)) = (lt.q_norm, lt.k_norm) {
                if !fused_qkv {
                    matvec(p, b16, m, lt.wq, &self.xn, &mut self.q_raw);
                    matvec(p, b16, m, lt.wk, &self.xn, &mut self.k_raw);
                }
                k.rmsnorm_forward(
                    &mut self.q,
                    &mut self.rstd[..c.n_heads],
                    &self.q_raw,
                    w(qn),
                    hd,
                    eps,
                );
                k.rmsnorm_forward(
                    k_row,
                    &mut self.rstd[..c.n_kv_heads],
                    &self.k_raw,
                    w(kn),
                    hd,
                    eps,
                );
            } else if !fused_qkv {
                matvec(p, b16, m, lt.wq, &self.xn, &mut self.q);
                matvec(p, b16, m, lt.wk, &self.xn, k_row);
            }
            if !fused_qkv {
                matvec(p, b16, m, lt.wv, &self.xn, v_row);
            }
            rope_forward(&mut self.q, c.n_heads, &m.rope, |_| pos);
            rope_forward(k_row, c.n_kv_heads, &m.rope, |_| pos);

            let (kc, vc) = (&self.k_cache[l], &self.v_cache[l]);
            let q = &self.q;
            let cap = self.capacity;
            let head = |(h, (out, scores)): (usize, (&mut [f32], &mut [f32]))| {
                let kvh = h / group;
                let qh = &q[h * hd..(h + 1) * hd];
                let scores = &mut scores[..=pos];
                for (j, s) in scores.iter_mut().enumerate() {
                    *s = dot(qh, &kc[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd]);
                }
                let max = crate::backend::cpu::math::max(scores);
                let sum = crate::backend::cpu::math::exp_scaled_shift_sum(scores, max, scale);
                out.fill(0.0);
                for (j, s) in scores.iter().enumerate() {
                    let pj = s / sum;
                    let vj = &vc[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd];
                    for (o, v) in out.iter_mut().zip(vj) {
                        *o += pj * v;
                    }
                }
            };
            let heads = self
                .att
                .chunks_mut(hd)
                .zip(self.scores.chunks_mut(cap))
                .enumerate();
            if (pos + 1) * qd >= 1 << 15 {
                use rayon::prelude::*;
                self.att
                    .par_chunks_mut(hd)
                    .zip(self.scores.par_chunks_mut(cap))
                    .enumerate()
                    .for_each(head);
            } else {
                heads.for_each(head);
            }
            matvec(p, b16, m, lt.wo, &self.att, &mut self.tmp);
            self.x.iter_mut().zip(&self.tmp).for_each(|(x, o)| *x += o);

            k.rmsnorm_forward(
                &mut self.xn,
                &mut self.rstd[..1],
                &self.x,
                w(lt.ffn_norm),
                d,
                eps,
            );
            if lay.range(lt.w_gate).end == lay.range(lt.w_up).start {
                let h13 = &mut self.qkv[..2 * f];
                matvec_stacked(p, b16, lay.range(lt.w_gate).start, 2 * f, d, &self.xn, h13);
                self.h1.copy_from_slice(&h13[..f]);
                self.h3.copy_from_slice(&h13[f..]);
            } else {
                matvec(p, b16, m, lt.w_gate, &self.xn, &mut self.h1);
                matvec(p, b16, m, lt.w_up, &self.xn, &mut self.h3);
            }
            k.swiglu_forward(&mut self.g, &self.h1, &self.h3);
            matvec(p, b16, m, lt.w_down, &self.g, &mut self.tmp);
            self.x.iter_mut().zip(&self.tmp).for_each(|(x, o)| *x += o);
        }
        k.rmsnorm_forward(
            &mut self.xn,
            &mut self.rstd[..1],
            &self.x,
            w(lay.final_norm),
            d,
            eps,
        );
        matvec(p, b16, m, lay.classifier(), &self.xn, &mut self.logits);
        if let Some(comp) = &m.compaction {
            // A compacted model never learned the other rows of its classifier.
            for (id, l) in self.logits.iter_mut().enumerate() {
                if comp.index(id as u32).is_none() {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        self.pos += 1;
        Ok(&self.logits)
    }
}
