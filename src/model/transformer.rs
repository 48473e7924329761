//! Whole-model forward and backward of a Llama / Qwen3 transformer over a batch of sequences,
//! written against the [`Kernels`] interface.
//!
//! Per layer (pre-norm):
//! ```text
//! xn1 = rmsnorm(x, attn_norm)
//! q, k, v = xn1 Wq^T, xn1 Wk^T, xn1 Wv^T
//! q, k = rmsnorm_per_head(q, q_norm), rmsnorm_per_head(k, k_norm)      (Qwen3 only)
//! q, k = rope(q), rope(k)
//! att = causal_gqa_attention(q, k, v)
//! x_mid = x + att Wo^T
//! xn2 = rmsnorm(x_mid, ffn_norm)
//! x_out = x_mid + (silu(xn2 Wgate^T) * (xn2 Wup^T)) Wdown^T
//! ```
//! then `logits = rmsnorm(x_L, norm) Wcls^T` and mean cross-entropy against the next tokens.

use std::time::Instant;

use super::activations::{Activations, LayerActivations};
use super::config::ModelConfig;
use super::params::ParamLayout;
use super::timing::Section;
use crate::backend::cpu::embedding::{embedding_backward, embedding_forward};
use crate::backend::cpu::rope::{RopeTable, rope_backward, rope_forward};
use crate::backend::{AttentionShape, Kernels};
use crate::error::{Error, Result};

/// Runs an expression and adds its wall time to a section of a `StepTimings`.
macro_rules! timed {
    ($timings:expr, $section:expr, $body:expr) => {{
        let start = Instant::now();
        let r = $body;
        $timings.add($section, start);
        r
    }};
}

/// A classifier restricted to the token ids that occur in the data ("vocab compaction").
/// Logits and the loss then cover only these ids: the loss is *not* a full-vocabulary loss and
/// is reported as "compacted".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VocabCompaction {
    /// Kept token ids, ascending; row `i` of the compact classifier is token `kept[i]`.
    pub kept: Vec<u32>,
    /// For each full-vocabulary id, its compact row, or `u32::MAX` if not kept.
    index_of: Vec<u32>,
}

impl VocabCompaction {
    /// Keeps the ids marked present (`present.len()` is the full vocabulary size).
    pub fn from_presence(present: &[bool]) -> Self {
        let kept: Vec<u32> = present
            .iter()
            .enumerate()
            .filter(|(_, p)| **p)
            .map(|(i, _)| i as u32)
            .collect();
        Self::from_kept(kept, present.len())
    }

    /// From an ascending list of kept ids below `vocab`.
    pub fn from_kept(kept: Vec<u32>, vocab: usize) -> Self {
        let mut index_of = vec![u32::MAX; vocab];
        for (i, &id) in kept.iter().enumerate() {
            if (id as usize) < vocab {
                index_of[id as usize] = i as u32;
            }
        }
        VocabCompaction { kept, index_of }
    }

    /// Number of kept ids.
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// The compact row of a token id.
    pub fn index(&self, id: u32) -> Option<u32> {
        self.index_of
            .get(id as usize)
            .copied()
            .filter(|&i| i != u32::MAX)
    }
}

/// A transformer: configuration, parameter layout and RoPE tables. Parameters, gradients and
/// activations are passed in, so one model can serve several batch shapes and buffers.
#[derive(Debug, Clone)]
pub struct Transformer {
    pub cfg: ModelConfig,
    pub layout: ParamLayout,
    pub rope: RopeTable,
    pub compaction: Option<VocabCompaction>,
}

impl Transformer {
    /// A model for a (validated) configuration.
    pub fn new(cfg: ModelConfig) -> Self {
        let layout = ParamLayout::new(&cfg);
        let rope = RopeTable::new(
            cfg.head_dim,
            cfg.max_seq_len,
            cfg.rope_theta,
            cfg.rope_style,
        );
        Transformer {
            cfg,
            layout,
            rope,
            compaction: None,
        }
    }

    /// Restricts the classifier to a compacted vocabulary (or lifts the restriction).
    pub fn set_compaction(&mut self, compaction: Option<VocabCompaction>) {
        self.compaction = compaction;
    }

    /// Rows of the classifier output: the full vocabulary or the compacted one.
    pub fn vocab_out(&self) -> usize {
        self.compaction
            .as_ref()
            .map_or(self.cfg.vocab_size, |c| c.len())
    }

    /// Activation buffers for `batch` sequences of `seq` tokens.
    pub fn activations(&self, batch: usize, seq: usize) -> Activations {
        Activations::new(&self.cfg, batch, seq, self.vocab_out())
    }

    fn attention_shape(&self, batch: usize, seq: usize) -> AttentionShape {
        AttentionShape {
            batch,
            seq,
            n_heads: self.cfg.n_heads,
            n_kv_heads: self.cfg.n_kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    fn check_inputs(&self, acts: &Activations, inputs: &[u32], params: &[f32]) -> Result<()> {
        let n = acts.batch * acts.seq;
        if inputs.len() != n {
            return Err(Error::invalid(format!(
                "expected {n} input tokens ({} x {}), got {}",
                acts.batch,
                acts.seq,
                inputs.len()
            )));
        }
        if acts.seq > self.cfg.max_seq_len {
            return Err(Error::invalid(format!(
                "sequence length {} exceeds the model's maximum of {} positions",
                acts.seq, self.cfg.max_seq_len
            )));
        }
        if params.len() != self.layout.total() {
            return Err(Error::invalid(format!(
                "expected {} parameters, got {}",
                self.layout.total(),
                params.len()
            )));
        }
        if let Some(pos) = inputs
            .iter()
            .position(|&t| t as usize >= self.cfg.vocab_size)
        {
            return Err(Error::invalid(format!(
                "input token {} at position {pos} is outside the vocabulary of {}",
                inputs[pos], self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// Maps next-token targets to classifier rows into `acts.targets`.
    fn map_targets(&self, acts: &mut Activations, targets: &[u32]) -> Result<()> {
        if targets.len() != acts.targets.len() {
            return Err(Error::invalid(format!(
                "expected {} targets, got {}",
                acts.targets.len(),
                targets.len()
            )));
        }
        for (i, (dst, &t)) in acts.targets.iter_mut().zip(targets).enumerate() {
            *dst = match &self.compaction {
                None if (t as usize) < self.cfg.vocab_size => t,
                Some(c) => c.index(t).ok_or_else(|| {
                    Error::invalid(format!(
                        "target token {t} at position {i} is not in the compacted vocabulary"
                    ))
                })?,
                None => {
                    return Err(Error::invalid(format!(
                        "target token {t} at position {i} is outside the vocabulary of {}",
                        self.cfg.vocab_size
                    )));
                }
            };
        }
        Ok(())
    }

    /// The forward pass: fills every saved activation and `acts.logits [n, vocab_out]`.
    /// `inputs` holds `batch * seq` token ids, sequence after sequence.
    pub fn forward(
        &self,
        k: &dyn Kernels,
        params: &[f32],
        acts: &mut Activations,
        inputs: &[u32],
    ) -> Result<()> {
        self.check_inputs(acts, inputs, params)?;
        let cfg = &self.cfg;
        let lay = &self.layout;
        let (t_len, n) = (acts.seq, acts.batch * acts.seq);
        let (d, qd, kvd, f, hd) = (
            cfg.dim,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.ffn_dim,
            cfg.head_dim,
        );
        let eps = cfg.norm_eps as f32;
        let shape = self.attention_shape(acts.batch, t_len);
        let pos = |i: usize| i % t_len;
        let w = |id| lay.view(params, id);

        timed!(
            acts.timings,
            Section::Embedding,
            embedding_forward(&mut acts.xs[0], w(lay.embed), inputs, d)
        );
        for (l, lt) in lay.layers.iter().enumerate() {
            let (before, after) = acts.xs.split_at_mut(l + 1);
            let x_in = &before[l];
            let x_out = &mut after[0];
            let la: &mut LayerActivations = &mut acts.layers[l];
            let tm = &mut acts.timings;

            // Attention block.
            timed!(
                tm,
                Section::Norms,
                k.rmsnorm_forward(&mut la.xn1, &mut la.rstd1, x_in, w(lt.attn_norm), d, eps)
            );
            if let (Some(qn), Some(kn)) = (lt.q_norm, lt.k_norm) {
                timed!(tm, Section::MatmulFwd, {
                    k.linear_forward(&mut la.q_raw, &la.xn1, w(lt.wq), n, d, qd);
                    k.linear_forward(&mut la.k_raw, &la.xn1, w(lt.wk), n, d, kvd);
                });
                timed!(tm, Section::Norms, {
                    k.rmsnorm_forward(&mut la.q, &mut la.rstd_q, &la.q_raw, w(qn), hd, eps);
                    k.rmsnorm_forward(&mut la.k, &mut la.rstd_k, &la.k_raw, w(kn), hd, eps);
                });
            } else {
                timed!(tm, Section::MatmulFwd, {
                    k.linear_forward(&mut la.q, &la.xn1, w(lt.wq), n, d, qd);
                    k.linear_forward(&mut la.k, &la.xn1, w(lt.wk), n, d, kvd);
                });
            }
            timed!(
                tm,
                Section::MatmulFwd,
                k.linear_forward(&mut la.v, &la.xn1, w(lt.wv), n, d, kvd)
            );
            timed!(tm, Section::Attention, {
                rope_forward(&mut la.q, cfg.n_heads, &self.rope, pos);
                rope_forward(&mut la.k, cfg.n_kv_heads, &self.rope, pos);
                k.attention_forward(&mut la.att, &mut la.probs, &la.q, &la.k, &la.v, &shape);
            });
            timed!(
                tm,
                Section::MatmulFwd,
                k.linear_forward(&mut acts.tmp, &la.att, w(lt.wo), n, qd, d)
            );
            timed!(
                tm,
                Section::Elementwise,
                k.add(&mut la.x_mid, x_in, &acts.tmp)
            );

            // Feed-forward block.
            timed!(
                tm,
                Section::Norms,
                k.rmsnorm_forward(
                    &mut la.xn2,
                    &mut la.rstd2,
                    &la.x_mid,
                    w(lt.ffn_norm),
                    d,
                    eps
                )
            );
            timed!(tm, Section::MatmulFwd, {
                k.linear_forward(&mut la.h1, &la.xn2, w(lt.w_gate), n, d, f);
                k.linear_forward(&mut la.h3, &la.xn2, w(lt.w_up), n, d, f);
            });
            timed!(
                tm,
                Section::Elementwise,
                k.swiglu_forward(&mut la.g, &la.h1, &la.h3)
            );
            timed!(
                tm,
                Section::MatmulFwd,
                k.linear_forward(&mut acts.tmp, &la.g, w(lt.w_down), n, f, d)
            );
            timed!(tm, Section::Elementwise, k.add(x_out, &la.x_mid, &acts.tmp));
        }

        let x_last = &acts.xs[cfg.n_layers];
        timed!(
            acts.timings,
            Section::Norms,
            k.rmsnorm_forward(
                &mut acts.xnf,
                &mut acts.rstdf,
                x_last,
                w(lay.final_norm),
                d,
                eps
            )
        );
        let cls = w(lay.classifier());
        timed!(
            acts.timings,
            Section::ClassifierLoss,
            match &self.compaction {
                None => k.linear_forward(&mut acts.logits, &acts.xnf, cls, n, d, cfg.vocab_size),
                Some(c) => {
                    for (row, &id) in acts.cls_w.chunks_exact_mut(d).zip(&c.kept) {
                        row.copy_from_slice(&cls[id as usize * d..(id as usize + 1) * d]);
                    }
                    k.linear_forward(&mut acts.logits, &acts.xnf, &acts.cls_w, n, d, c.len());
                }
            }
        );
        Ok(())
    }

    /// Forward pass and mean cross-entropy loss against `targets` (no gradients).
    pub fn loss(
        &self,
        k: &dyn Kernels,
        params: &[f32],
        acts: &mut Activations,
        inputs: &[u32],
        targets: &[u32],
    ) -> Result<f64> {
        self.map_targets(acts, targets)?;
        self.forward(k, params, acts, inputs)?;
        let n = acts.targets.len();
        Ok(timed!(
            acts.timings,
            Section::ClassifierLoss,
            k.cross_entropy_loss(&acts.logits, &acts.targets, acts.vocab_out)
        ) / n as f64)
    }

    /// Forward and backward. Returns the mean loss over the `batch * seq` targets and *adds*
    /// `loss_scale * d(mean loss)/d(params)` into `grads` (same layout as `params`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward(
        &self,
        k: &dyn Kernels,
        params: &[f32],
        grads: &mut [f32],
        acts: &mut Activations,
        inputs: &[u32],
        targets: &[u32],
        loss_scale: f32,
    ) -> Result<f64> {
        if grads.len() != params.len() {
            return Err(Error::invalid(
                "gradient buffer does not match the parameters",
            ));
        }
        self.map_targets(acts, targets)?;
        self.forward(k, params, acts, inputs)?;
        let cfg = &self.cfg;
        let lay = &self.layout;
        let (t_len, n) = (acts.seq, acts.batch * acts.seq);
        let (d, qd, kvd, f, hd) = (
            cfg.dim,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.ffn_dim,
            cfg.head_dim,
        );
        let shape = self.attention_shape(acts.batch, t_len);
        let pos = |i: usize| i % t_len;
        let vocab_out = acts.vocab_out;
        let w = |id| lay.view(params, id);

        // Loss, classifier and final norm.
        let t0 = Instant::now();
        let loss_sum = k.cross_entropy_forward_backward(
            &mut acts.logits,
            &acts.targets,
            vocab_out,
            loss_scale / n as f32,
        );
        let dlogits = &acts.logits;
        let cls_id = lay.classifier();
        match &self.compaction {
            None => {
                k.linear_backward_input(&mut acts.dxn, dlogits, w(cls_id), n, d, vocab_out, false);
                k.linear_backward_weight(
                    lay.view_mut(grads, cls_id),
                    dlogits,
                    &acts.xnf,
                    n,
                    d,
                    vocab_out,
                );
            }
            Some(c) => {
                k.linear_backward_input(
                    &mut acts.dxn,
                    dlogits,
                    &acts.cls_w,
                    n,
                    d,
                    vocab_out,
                    false,
                );
                acts.cls_dw.fill(0.0);
                k.linear_backward_weight(&mut acts.cls_dw, dlogits, &acts.xnf, n, d, vocab_out);
                let g = lay.view_mut(grads, cls_id);
                for (row, &id) in acts.cls_dw.chunks_exact(d).zip(&c.kept) {
                    for (a, b) in g[id as usize * d..(id as usize + 1) * d]
                        .iter_mut()
                        .zip(row)
                    {
                        *a += b;
                    }
                }
            }
        }
        acts.timings.add(Section::ClassifierLoss, t0);
        timed!(
            acts.timings,
            Section::Norms,
            k.rmsnorm_backward(
                &mut acts.dx,
                lay.view_mut(grads, lay.final_norm),
                &acts.dxn,
                &acts.xs[cfg.n_layers],
                w(lay.final_norm),
                &acts.rstdf,
                d,
                false,
            )
        );

        // `acts.dx` holds d(loss)/d(residual stream) and flows down through the layers.
        for (l, lt) in lay.layers.iter().enumerate().rev() {
            let la = &acts.layers[l];
            let x_in = &acts.xs[l];
            let tm = &mut acts.timings;

            // Feed-forward block: x_out = x_mid + down(swiglu(gate(xn2), up(xn2))).
            timed!(
                tm,
                Section::MatmulDgrad,
                k.linear_backward_input(&mut acts.dg, &acts.dx, w(lt.w_down), n, f, d, false)
            );
            timed!(
                tm,
                Section::MatmulWgrad,
                k.linear_backward_weight(lay.view_mut(grads, lt.w_down), &acts.dx, &la.g, n, f, d)
            );
            timed!(
                tm,
                Section::Elementwise,
                k.swiglu_backward(&mut acts.dh1, &mut acts.dh3, &acts.dg, &la.h1, &la.h3)
            );
            timed!(tm, Section::MatmulDgrad, {
                k.linear_backward_input(&mut acts.dxn, &acts.dh1, w(lt.w_gate), n, d, f, false);
                k.linear_backward_input(&mut acts.dxn, &acts.dh3, w(lt.w_up), n, d, f, true);
            });
            timed!(tm, Section::MatmulWgrad, {
                k.linear_backward_weight(
                    lay.view_mut(grads, lt.w_gate),
                    &acts.dh1,
                    &la.xn2,
                    n,
                    d,
                    f,
                );
                k.linear_backward_weight(lay.view_mut(grads, lt.w_up), &acts.dh3, &la.xn2, n, d, f);
            });
            timed!(
                tm,
                Section::Norms,
                k.rmsnorm_backward(
                    &mut acts.dx,
                    lay.view_mut(grads, lt.ffn_norm),
                    &acts.dxn,
                    &la.x_mid,
                    w(lt.ffn_norm),
                    &la.rstd2,
                    d,
                    true,
                )
            );

            // Attention block: x_mid = x_in + o_proj(attention(...)).
            timed!(
                tm,
                Section::MatmulDgrad,
                k.linear_backward_input(&mut acts.datt, &acts.dx, w(lt.wo), n, qd, d, false)
            );
            timed!(
                tm,
                Section::MatmulWgrad,
                k.linear_backward_weight(lay.view_mut(grads, lt.wo), &acts.dx, &la.att, n, qd, d)
            );
            timed!(tm, Section::Attention, {
                k.attention_backward(
                    &mut acts.dq,
                    &mut acts.dk,
                    &mut acts.dv,
                    &acts.datt,
                    &la.probs,
                    &la.q,
                    &la.k,
                    &la.v,
                    &shape,
                );
                rope_backward(&mut acts.dq, cfg.n_heads, &self.rope, pos);
                rope_backward(&mut acts.dk, cfg.n_kv_heads, &self.rope, pos);
            });
            // Gradients with respect to the projections' outputs.
            let (dq_proj, dk_proj): (&[f32], &[f32]) =
                if let (Some(qn), Some(kn)) = (lt.q_norm, lt.k_norm) {
                    // `datt` is free again: it receives the gradient before the query norm.
                    timed!(tm, Section::Norms, {
                        k.rmsnorm_backward(
                            &mut acts.datt,
                            lay.view_mut(grads, qn),
                            &acts.dq,
                            &la.q_raw,
                            w(qn),
                            &la.rstd_q,
                            hd,
                            false,
                        );
                        k.rmsnorm_backward(
                            &mut acts.dk_raw,
                            lay.view_mut(grads, kn),
                            &acts.dk,
                            &la.k_raw,
                            w(kn),
                            &la.rstd_k,
                            hd,
                            false,
                        );
                    });
                    (&acts.datt, &acts.dk_raw)
                } else {
                    (&acts.dq, &acts.dk)
                };
            timed!(tm, Section::MatmulDgrad, {
                k.linear_backward_input(&mut acts.dxn, dq_proj, w(lt.wq), n, d, qd, false);
                k.linear_backward_input(&mut acts.dxn, dk_proj, w(lt.wk), n, d, kvd, true);
                k.linear_backward_input(&mut acts.dxn, &acts.dv, w(lt.wv), n, d, kvd, true);
            });
            timed!(tm, Section::MatmulWgrad, {
                k.linear_backward_weight(lay.view_mut(grads, lt.wq), dq_proj, &la.xn1, n, d, qd);
                k.linear_backward_weight(lay.view_mut(grads, lt.wk), dk_proj, &la.xn1, n, d, kvd);
                k.linear_backward_weight(lay.view_mut(grads, lt.wv), &acts.dv, &la.xn1, n, d, kvd);
            });
            timed!(
                tm,
                Section::Norms,
                k.rmsnorm_backward(
                    &mut acts.dx,
                    lay.view_mut(grads, lt.attn_norm),
                    &acts.dxn,
                    x_in,
                    w(lt.attn_norm),
                    &la.rstd1,
                    d,
                    true,
                )
            );
        }
        timed!(
            acts.timings,
            Section::Embedding,
            embedding_backward(lay.view_mut(grads, lay.embed), &acts.dx, inputs, d)
        );
        Ok(loss_sum / n as f64)
    }
}
