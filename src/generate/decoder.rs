//! Incremental decoding with a key/value cache: one token at a time, each step attending to the
//! cached keys and values of all earlier positions (GQA: query head `h` reads cached head
//! `h / (heads / kv_heads)`, as in training).

use crate::backend::Kernels;
use crate::backend::cpu::attention::dot;
use crate::backend::cpu::embedding::embedding_forward;
use crate::backend::cpu::rope::rope_forward;
use crate::error::{Error, Result};
use crate::model::Transformer;

/// Per-layer key/value cache plus decoding scratch buffers.
pub struct Decoder<'m> {
    model: &'m Transformer,
    params: &'m [f32],
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
    scores: Vec<f32>,
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
            scores: z(capacity),
            h1: z(c.ffn_dim),
            h3: z(c.ffn_dim),
            g: z(c.ffn_dim),
            tmp: z(c.dim),
            rstd: z(c.n_heads.max(c.n_kv_heads).max(1)),
            logits: z(c.vocab_size),
        })
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
        let (d, qd, kvd, f, hd) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim, c.head_dim);
        let eps = c.norm_eps as f32;
        let pos = self.pos;
        let p = self.params;
        let w = |id| lay.view(p, id);
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
            if let (Some(qn), Some(kn)) = (lt.q_norm, lt.k_norm) {
                k.linear_forward(&mut self.q_raw, &self.xn, w(lt.wq), 1, d, qd);
                k.linear_forward(&mut self.k_raw, &self.xn, w(lt.wk), 1, d, kvd);
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
            } else {
                k.linear_forward(&mut self.q, &self.xn, w(lt.wq), 1, d, qd);
                k.linear_forward(k_row, &self.xn, w(lt.wk), 1, d, kvd);
            }
            k.linear_forward(v_row, &self.xn, w(lt.wv), 1, d, kvd);
            rope_forward(&mut self.q, c.n_heads, &m.rope, |_| pos);
            rope_forward(k_row, c.n_kv_heads, &m.rope, |_| pos);

            let (kc, vc) = (&self.k_cache[l], &self.v_cache[l]);
            for h in 0..c.n_heads {
                let kvh = h / group;
                let qh = &self.q[h * hd..(h + 1) * hd];
                let scores = &mut self.scores[..=pos];
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    let kj = &kc[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd];
                    *s = dot(qh, kj) * scale;
                    max = max.max(*s);
                }
                let mut sum = 0.0;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let out = &mut self.att[h * hd..(h + 1) * hd];
                out.fill(0.0);
                for (j, s) in scores.iter().enumerate() {
                    let pj = s / sum;
                    let vj = &vc[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd];
                    for (o, v) in out.iter_mut().zip(vj) {
                        *o += pj * v;
                    }
                }
            }
            k.linear_forward(&mut self.tmp, &self.att, w(lt.wo), 1, qd, d);
            self.x.iter_mut().zip(&self.tmp).for_each(|(x, o)| *x += o);

            k.rmsnorm_forward(
                &mut self.xn,
                &mut self.rstd[..1],
                &self.x,
                w(lt.ffn_norm),
                d,
                eps,
            );
            k.linear_forward(&mut self.h1, &self.xn, w(lt.w_gate), 1, d, f);
            k.linear_forward(&mut self.h3, &self.xn, w(lt.w_up), 1, d, f);
            k.swiglu_forward(&mut self.g, &self.h1, &self.h3);
            k.linear_forward(&mut self.tmp, &self.g, w(lt.w_down), 1, f, d);
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
        k.linear_forward(
            &mut self.logits,
            &self.xn,
            w(lay.classifier()),
            1,
            d,
            c.vocab_size,
        );
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
