//! Whole-model forward and backward of a Llama / Qwen3 transformer over a batch of sequences,
//! written against the [`Kernels`] interface. The layer forward ([`Transformer::layer_forward`])
//! is shared by training and by the KV-cache decoder.
//!
//! Per layer (pre-norm), with the block method that computes each line:
//! ```text
//! xn1   = rmsnorm(x, attn_norm)                                       rmsnorm_forward
//! q,k,v = xn1 Wq^T, xn1 Wk^T, xn1 Wv^T                                sdpa_forward
//! q, k  = rmsnorm_per_head(q, q_norm), rmsnorm_per_head(k, k_norm)    (Qwen3 only)
//! q, k  = rope(q), rope(k)
//! att   = causal_gqa_attention(q, k, v)
//! x_mid = x + att Wo^T                                                wo_forward
//! xn2   = rmsnorm(x_mid, ffn_norm)                                    rmsnorm_forward
//! x_out = x_mid + (silu(xn2 Wgate^T) * (xn2 Wup^T)) Wdown^T           ffn_forward
//! ```
//! then `logits = rmsnorm(x_L, norm) Wcls^T` and mean cross-entropy against the next tokens.
//! The backward pass runs the same lines in reverse: `ffn_backward_down` (ffnBwdW2t), SwiGLU
//! backward, `ffn_backward_gate_up` (ffnBwdW13t), RMSNorm backward, `wo_backward` (wotBwd),
//! `sdpa_backward` (sdpaBwd1+2), RoPE and q/k-norm backward, `q_backward` (qBwd),
//! `kv_backward` (kvBwd), RMSNorm backward; weight gradients (`linear_backward_weight`) as
//! each input gradient is formed.

use std::time::Instant;

use super::activations::{Activations, LayerActivations};
use super::config::ModelConfig;
use super::frozen::FrozenModel;
use super::lora::{LoraLayout, LoraTarget};
use super::lora_pass::{self, Adapters, LoraActs};
use super::params::{ParamLayout, TensorId};
use super::timing::{Section, StepTimings, timed};
use super::weights::{LayerWeights, Weights};
use crate::backend::blocks::{FfnForward, SdpaForward};
use crate::backend::{
    Attend, AttentionShape, GateUpDelta, IGNORE_TARGET, Kernels, LinearShape, Matrix, NormSaved,
    Positions, QkvDelta, QkvGrads, RopeTable, StepShape,
};
use crate::error::{Error, Result};

/// One micro-batch: `batch * seq` input token ids, sequence after sequence, and the next-token
/// targets in the same layout.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub inputs: &'a [u32],
    pub targets: &'a [u32],
}

/// The residual stream into and out of one layer, and where its attention looks.
pub struct LayerIo<'a> {
    /// `[rows, dim]`.
    pub x_in: &'a [f32],
    /// `[rows, dim]`.
    pub x_out: &'a mut [f32],
    pub attend: Attend<'a>,
}

/// The adapters of one layer in a forward pass, and where they keep what the backward pass
/// needs.
pub struct LayerLora<'a> {
    pub adapters: &'a Adapters<'a>,
    pub layer: usize,
    pub acts: &'a mut LoraActs,
}

impl LayerLora<'_> {
    fn forward(&mut self, k: &dyn Kernels, t: LoraTarget, x: &[f32]) -> Result<()> {
        lora_pass::forward(k, self.adapters, self.layer, t, x, self.acts)
    }

    /// The term projection `t` adds to its output, when it is adapted.
    fn delta(&self, t: LoraTarget) -> Option<&[f32]> {
        self.adapters
            .of(self.layer, t)
            .map(|_| &self.acts.delta[t.index()][..])
    }
}

/// What the backward pass calls with the gradients and the offset from which they are
/// complete.
type ReadyHook<'g> = &'g mut dyn FnMut(&[f32], usize);

/// Where a backward pass puts its gradients.
struct GradSink<'a, 'g> {
    /// Every parameter of the model (its layout); `None` when the model is frozen.
    model: Option<&'g mut [f32]>,
    /// The adapters' gradients (their layout), when the model runs with adapters.
    lora: Option<(&'a Adapters<'a>, &'g mut [f32])>,
    /// Where the gradient of a frozen norm gain goes (discarded).
    frozen_dw: Vec<f32>,
    /// Told as the backward pass goes from which offset on the model's gradients are complete
    /// (see [`ParamLayout::backward_ready_points`]), with the gradients so far.
    ready: Option<ReadyHook<'g>>,
}

impl GradSink<'_, '_> {
    /// Says that the model's gradients from `offset` on are complete.
    fn complete_from(&mut self, offset: usize) {
        if let (Some(g), Some(f)) = (self.model.as_deref(), self.ready.as_mut()) {
            f(g, offset);
        }
    }

    /// The gradient buffer of a vector parameter (a norm gain): its slot in the model's
    /// gradients, or scratch when the model is frozen.
    fn vector<'s>(&'s mut self, layout: &ParamLayout, id: TensorId) -> &'s mut [f32] {
        let len = layout.tensors[id].len();
        match self.model.as_deref_mut() {
            Some(g) => layout.view_mut(g, id),
            None => {
                if self.frozen_dw.len() < len {
                    self.frozen_dw.resize(len, 0.0);
                }
                &mut self.frozen_dw[..len]
            }
        }
    }
}

/// The frozen model a LoRA pass adapts: f32 parameters, or a compact copy
/// (`--base-weights bf16|q8`) read a layer at a time.
#[derive(Debug, Clone, Copy)]
pub enum Base<'a> {
    F32(&'a [f32]),
    Compact(&'a FrozenModel),
}

impl Base<'_> {
    fn total(&self) -> usize {
        match self {
            Base::F32(p) => p.len(),
            Base::Compact(m) => m.total(),
        }
    }
}

/// Rows of a compact classifier expanded at a time.
const CLASSIFIER_CHUNK: usize = 4096;

/// Where a pass reads the model's weights.
#[derive(Clone, Copy)]
enum PassWeights<'a> {
    /// Views of f32 parameters (with a compact copy for inference formats).
    Full(Weights<'a>),
    /// A compact frozen model, expanded as the pass reaches each part.
    Compact {
        layout: &'a ParamLayout,
        model: &'a FrozenModel,
    },
}

impl<'a> PassWeights<'a> {
    fn of(layout: &'a ParamLayout, base: Base<'a>) -> Self {
        match base {
            Base::F32(p) => PassWeights::Full(Weights::new(layout, p)),
            Base::Compact(model) => PassWeights::Compact { layout, model },
        }
    }

    /// The weights holding layer `l` (a compact model's layer expanded into `scratch`).
    fn layer<'s>(&self, l: usize, scratch: &'s mut Vec<f32>) -> Weights<'s>
    where
        'a: 's,
    {
        match *self {
            PassWeights::Full(w) => w,
            PassWeights::Compact { layout, model } => {
                let offset = model.expand_layer(layout, l, scratch);
                Weights::window(layout, scratch, offset)
            }
        }
    }

    /// A vector (norm gain).
    fn vector(&self, id: TensorId) -> &'a [f32] {
        match *self {
            PassWeights::Full(w) => w.vector(id),
            PassWeights::Compact { model, .. } => model.vector(id),
        }
    }
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
        let rope = RopeTable::for_model(&cfg.dims());
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

    /// What a backend prepares for to run `batch` sequences of `seq` tokens.
    pub fn step_shape(&self, batch: usize, seq: usize) -> StepShape {
        StepShape {
            dims: self.cfg.dims(),
            batch,
            seq,
            vocab_out: self.vocab_out(),
        }
    }

    /// Activation buffers for `batch` sequences of `seq` tokens, with the attention state the
    /// backend `k` saves.
    pub fn activations(&self, k: &dyn Kernels, batch: usize, seq: usize) -> Activations {
        let saved = k.attention_saved_len(&self.attention_shape(batch, seq));
        Activations::new(&self.cfg, batch, seq, self.vocab_out(), saved)
    }

    /// Bytes of [`Transformer::activations`], computed without allocating.
    pub fn activation_bytes(&self, k: &dyn Kernels, batch: usize, seq: usize) -> usize {
        let saved = k.attention_saved_len(&self.attention_shape(batch, seq));
        Activations::bytes_needed(&self.cfg, batch, seq, self.vocab_out(), saved)
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

    fn check_inputs(&self, acts: &Activations, inputs: &[u32], params: usize) -> Result<()> {
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
        if params != self.layout.total() {
            return Err(Error::invalid(format!(
                "expected {} parameters, got {params}",
                self.layout.total(),
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

    /// Maps next-token targets to classifier rows into `acts.targets`; [`IGNORE_TARGET`] stays
    /// as it is. Returns how many targets count in the loss.
    fn map_targets(&self, acts: &mut Activations, targets: &[u32]) -> Result<usize> {
        if targets.len() != acts.targets.len() {
            return Err(Error::invalid(format!(
                "expected {} targets, got {}",
                acts.targets.len(),
                targets.len()
            )));
        }
        let mut counted = 0;
        for (i, (dst, &t)) in acts.targets.iter_mut().zip(targets).enumerate() {
            counted += usize::from(t != IGNORE_TARGET);
            *dst = match &self.compaction {
                _ if t == IGNORE_TARGET => t,
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
        Ok(counted)
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
        self.check_inputs(acts, inputs, params.len())?;
        let w = PassWeights::Full(Weights::new(&self.layout, params));
        self.forward_with(k, &w, acts, inputs, None)
    }

    /// [`Transformer::forward`] of the frozen model `base` with LoRA adapters (`acts` from
    /// [`Transformer::activations_adapted`]).
    pub fn forward_adapted(
        &self,
        k: &dyn Kernels,
        base: Base,
        adapters: &Adapters,
        acts: &mut Activations,
        inputs: &[u32],
    ) -> Result<()> {
        self.check_inputs(acts, inputs, base.total())?;
        self.check_adapters(adapters, acts)?;
        let w = PassWeights::of(&self.layout, base);
        self.forward_with(k, &w, acts, inputs, Some(adapters))
    }

    /// Activation buffers, as [`Transformer::activations`], with room for the adapters of
    /// `lora`.
    pub fn activations_adapted(
        &self,
        k: &dyn Kernels,
        lora: &LoraLayout,
        batch: usize,
        seq: usize,
    ) -> Activations {
        let mut acts = self.activations(k, batch, seq);
        acts.lora = Some(LoraActs::new(lora, batch * seq, self.norm_width()));
        acts
    }

    /// Bytes of [`Transformer::activations_adapted`], computed without allocating.
    pub fn activation_bytes_adapted(
        &self,
        k: &dyn Kernels,
        lora: &LoraLayout,
        batch: usize,
        seq: usize,
    ) -> usize {
        self.activation_bytes(k, batch, seq)
            + LoraActs::bytes_needed(lora, batch * seq, self.norm_width())
    }

    fn norm_width(&self) -> usize {
        self.cfg.dim.max(self.cfg.head_dim)
    }

    fn check_adapters(&self, adapters: &Adapters, acts: &Activations) -> Result<()> {
        let lay = adapters.layout;
        if adapters.params.len() != lay.total() || lay.layers.len() != self.cfg.n_layers {
            return Err(Error::invalid(format!(
                "the adapters ({} values for {} layers) do not fit this model ({} layers, {} \
                 adapter values expected)",
                adapters.params.len(),
                lay.layers.len(),
                self.cfg.n_layers,
                lay.total()
            )));
        }
        match &acts.lora {
            Some(la) if la.rows() == acts.batch * acts.seq => Ok(()),
            _ => Err(Error::invalid(
                "activations without room for adapters: make them with activations_adapted",
            )),
        }
    }

    fn forward_with(
        &self,
        k: &dyn Kernels,
        w: &PassWeights,
        acts: &mut Activations,
        inputs: &[u32],
        adapters: Option<&Adapters>,
    ) -> Result<()> {
        let lay = &self.layout;
        let (d, n) = (self.cfg.dim, acts.batch * acts.seq);
        let eps = self.cfg.norm_eps as f32;
        timed!(
            acts.timings,
            Section::Embedding,
            match w {
                PassWeights::Full(w) =>
                    k.embedding_forward(&mut acts.xs[0], w.vector(lay.embed), inputs, d),
                PassWeights::Compact { model, .. } => {
                    for (row, &t) in acts.xs[0].chunks_exact_mut(d).zip(inputs) {
                        let t = t as usize;
                        model.expand(lay.embed, t * d..(t + 1) * d, row);
                    }
                    Ok(())
                }
            }
        )?;
        let mut scratch = Vec::new();
        for (l, la) in acts.layers.iter_mut().enumerate() {
            let (before, after) = acts.xs.split_at_mut(l + 1);
            let io = LayerIo {
                x_in: &before[l],
                x_out: &mut after[0],
                attend: Attend::Causal {
                    batch: acts.batch,
                    seq: acts.seq,
                },
            };
            let lora = match (adapters, acts.lora.as_mut()) {
                (Some(adapters), Some(la)) => Some(LayerLora {
                    adapters,
                    layer: l,
                    acts: la,
                }),
                _ => None,
            };
            let lw = w.layer(l, &mut scratch);
            self.layer_forward(k, &lw.layer(l), la, io, &mut acts.timings, lora)?;
        }
        drop(scratch);
        timed!(
            acts.timings,
            Section::Norms,
            k.rmsnorm_forward(
                &mut acts.xnf,
                &mut acts.rstdf,
                &acts.xs[self.cfg.n_layers],
                w.vector(lay.final_norm),
                d,
                eps
            )
        )?;
        let t0 = Instant::now();
        let cls_id = lay.classifier();
        let cls = match (&self.compaction, w) {
            (None, PassWeights::Full(w)) => w.matrix(cls_id),
            (None, PassWeights::Compact { model, .. }) => {
                self.compact_classifier_forward(k, model, acts)?;
                acts.timings.add(Section::ClassifierLoss, t0);
                return Ok(());
            }
            (Some(c), _) => {
                for (row, &id) in acts.cls_w.chunks_exact_mut(d).zip(&c.kept) {
                    let id = id as usize;
                    match w {
                        PassWeights::Full(w) => {
                            row.copy_from_slice(&w.vector(cls_id)[id * d..(id + 1) * d])
                        }
                        PassWeights::Compact { model, .. } => {
                            model.expand(cls_id, id * d..(id + 1) * d, row)
                        }
                    }
                }
                Matrix::new(&acts.cls_w, c.len(), d)
            }
        };
        k.linear_forward(&mut acts.logits, &acts.xnf, cls, n)?;
        acts.timings.add(Section::ClassifierLoss, t0);
        Ok(())
    }

    /// `logits = xnf Wcls^T` with a compact classifier, a block of its rows at a time.
    fn compact_classifier_forward(
        &self,
        k: &dyn Kernels,
        model: &FrozenModel,
        acts: &mut Activations,
    ) -> Result<()> {
        let (d, n, v) = (self.cfg.dim, acts.batch * acts.seq, acts.vocab_out);
        let cls_id = self.layout.classifier();
        let chunk = CLASSIFIER_CHUNK.min(v);
        let (mut w, mut out) = (vec![0.0f32; chunk * d], vec![0.0f32; n * chunk]);
        for v0 in (0..v).step_by(chunk) {
            let c = chunk.min(v - v0);
            model.expand(cls_id, v0 * d..(v0 + c) * d, &mut w[..c * d]);
            let out = &mut out[..n * c];
            k.linear_forward(out, &acts.xnf, Matrix::new(&w[..c * d], c, d), n)?;
            for (dst, src) in acts.logits.chunks_exact_mut(v).zip(out.chunks_exact(c)) {
                dst[v0..v0 + c].copy_from_slice(src);
            }
        }
        Ok(())
    }

    /// `dxn = dlogits Wcls` with a compact classifier, a block of its rows at a time.
    fn compact_classifier_backward_input(
        &self,
        k: &dyn Kernels,
        model: &FrozenModel,
        acts: &mut Activations,
    ) -> Result<()> {
        let (d, n, v) = (self.cfg.dim, acts.batch * acts.seq, acts.vocab_out);
        let cls_id = self.layout.classifier();
        let chunk = CLASSIFIER_CHUNK.min(v);
        let (mut w, mut dy) = (vec![0.0f32; chunk * d], vec![0.0f32; n * chunk]);
        for v0 in (0..v).step_by(chunk) {
            let c = chunk.min(v - v0);
            model.expand(cls_id, v0 * d..(v0 + c) * d, &mut w[..c * d]);
            let dy = &mut dy[..n * c];
            for (dst, src) in dy.chunks_exact_mut(c).zip(acts.logits.chunks_exact(v)) {
                dst.copy_from_slice(&src[v0..v0 + c]);
            }
            let s = LinearShape {
                rows: n,
                d_in: d,
                d_out: c,
            };
            k.linear_backward_input(&mut acts.dxn, dy, &w[..c * d], s, v0 > 0)?;
        }
        Ok(())
    }

    /// One layer forward over `la`'s rows: training and whole-sequence passes attend causally
    /// within each sequence, the decoder against its key/value cache. With `lora`, each
    /// adapted projection adds its low-rank term to its output.
    pub fn layer_forward(
        &self,
        k: &dyn Kernels,
        w: &LayerWeights,
        la: &mut LayerActivations,
        io: LayerIo,
        tm: &mut StepTimings,
        mut lora: Option<LayerLora>,
    ) -> Result<()> {
        use LoraTarget::{Down, Gate, K, O, Q, Up, V};
        let dims = self.cfg.dims();
        let (d, eps, rows) = (dims.dim, dims.norm_eps, la.rstd1.len());
        let LayerIo {
            x_in,
            x_out,
            attend,
        } = io;
        timed!(
            tm,
            Section::Norms,
            k.rmsnorm_forward(&mut la.xn1, &mut la.rstd1, x_in, w.attn_norm, d, eps)
        )?;
        if let Some(ll) = lora.as_mut() {
            timed!(tm, Section::Lora, {
                for t in [Q, K, V] {
                    ll.forward(k, t, &la.xn1)?;
                }
                Ok::<(), Error>(())
            })?;
        }
        let sdpa = SdpaForward {
            dims: &dims,
            xn: &la.xn1,
            w: &w.attn,
            rope: &self.rope,
            acts: &mut la.attn,
            attend,
            delta: lora.as_ref().map(|ll| QkvDelta {
                q: ll.delta(Q),
                k: ll.delta(K),
                v: ll.delta(V),
            }),
        };
        timed!(tm, Section::SdpaFwd, k.sdpa_forward(sdpa))?;
        timed!(
            tm,
            Section::WoFwd,
            k.wo_forward(&mut la.x_mid, &la.attn.att, w.attn.wo, x_in, rows)
        )?;
        if let Some(ll) = lora.as_mut() {
            timed!(tm, Section::Lora, {
                ll.forward(k, O, &la.attn.att)?;
                match ll.delta(O) {
                    Some(add) => k.residual_add(&mut la.x_mid, add),
                    None => Ok(()),
                }
            })?;
        }
        timed!(
            tm,
            Section::Norms,
            k.rmsnorm_forward(&mut la.xn2, &mut la.rstd2, &la.x_mid, w.ffn_norm, d, eps)
        )?;
        if let Some(ll) = lora.as_mut() {
            timed!(tm, Section::Lora, {
                ll.forward(k, Gate, &la.xn2)?;
                ll.forward(k, Up, &la.xn2)
            })?;
        }
        let ffn = FfnForward {
            xn: &la.xn2,
            residual: &la.x_mid,
            out: &mut *x_out,
            w: &w.ffn,
            acts: &mut la.ffn,
            rows,
            delta: lora.as_ref().map(|ll| GateUpDelta {
                gate: ll.delta(Gate),
                up: ll.delta(Up),
            }),
        };
        timed!(tm, Section::FfnFwd, k.ffn_forward(ffn))?;
        if let Some(ll) = lora.as_mut() {
            timed!(tm, Section::Lora, {
                ll.forward(k, Down, &la.ffn.g)?;
                match ll.delta(Down) {
                    Some(add) => k.residual_add(x_out, add),
                    None => Ok(()),
                }
            })?;
        }
        Ok(())
    }

    /// Forward pass and mean cross-entropy loss (no gradients).
    pub fn loss(
        &self,
        k: &dyn Kernels,
        params: &[f32],
        acts: &mut Activations,
        batch: Batch,
    ) -> Result<f64> {
        self.loss_with(k, &Weights::new(&self.layout, params), params, acts, batch)
    }

    /// [`Transformer::loss`] with weights that may carry a compact copy of the matrices
    /// (`w` is a view of `params`), for evaluating inference formats.
    pub fn loss_with(
        &self,
        k: &dyn Kernels,
        w: &Weights,
        params: &[f32],
        acts: &mut Activations,
        batch: Batch,
    ) -> Result<f64> {
        self.check_inputs(acts, batch.inputs, params.len())?;
        self.loss_of(k, &PassWeights::Full(*w), acts, batch, None)
    }

    /// [`Transformer::loss`] of the frozen model `base` with LoRA adapters (no dropout unless
    /// `adapters` carries a seed).
    pub fn loss_adapted(
        &self,
        k: &dyn Kernels,
        base: Base,
        adapters: &Adapters,
        acts: &mut Activations,
        batch: Batch,
    ) -> Result<f64> {
        self.check_adapters(adapters, acts)?;
        self.check_inputs(acts, batch.inputs, base.total())?;
        let w = PassWeights::of(&self.layout, base);
        self.loss_of(k, &w, acts, batch, Some(adapters))
    }

    fn loss_of(
        &self,
        k: &dyn Kernels,
        w: &PassWeights,
        acts: &mut Activations,
        batch: Batch,
        adapters: Option<&Adapters>,
    ) -> Result<f64> {
        let counted = self.map_targets(acts, batch.targets)?;
        self.forward_with(k, w, acts, batch.inputs, adapters)?;
        let sum = timed!(
            acts.timings,
            Section::ClassifierLoss,
            k.cross_entropy_loss(&acts.logits, &acts.targets, acts.vocab_out)
        )?;
        Ok(sum / counted.max(1) as f64)
    }

    /// Forward and backward. Returns the mean loss over the counted targets of the batch
    /// (every one but [`IGNORE_TARGET`]) and *adds* `loss_scale * d(mean loss)/d(params)` into
    /// `grads` (same layout as `params`).
    pub fn forward_backward(
        &self,
        k: &dyn Kernels,
        params: &[f32],
        grads: &mut [f32],
        acts: &mut Activations,
        batch: Batch,
        loss_scale: f32,
    ) -> Result<f64> {
        self.model_pass(k, params, grads, acts, batch, loss_scale, None)
    }

    /// [`Transformer::forward_backward`], calling `ready(grads, offset)` each time the
    /// backward pass has completed the gradients from `offset` to the end of the buffer (the
    /// offsets of [`ParamLayout::backward_ready_points`], in that order), so that they can be
    /// sent to other ranks while it goes on.
    #[allow(clippy::too_many_arguments)] // forward_backward's arguments and the hook
    pub fn forward_backward_reporting(
        &self,
        k: &dyn Kernels,
        params: &[f32],
        grads: &mut [f32],
        acts: &mut Activations,
        batch: Batch,
        loss_scale: f32,
        ready: &mut dyn FnMut(&[f32], usize),
    ) -> Result<f64> {
        self.model_pass(k, params, grads, acts, batch, loss_scale, Some(ready))
    }

    /// Forward and backward with the model's own gradients (and the completion hook, if any).
    #[allow(clippy::too_many_arguments)] // forward_backward's arguments and the hook
    fn model_pass<'g>(
        &self,
        k: &dyn Kernels,
        params: &[f32],
        grads: &'g mut [f32],
        acts: &mut Activations,
        batch: Batch,
        loss_scale: f32,
        ready: Option<ReadyHook<'g>>,
    ) -> Result<f64> {
        if grads.len() != params.len() {
            return Err(Error::invalid(
                "gradient buffer does not match the parameters",
            ));
        }
        let sink = GradSink {
            model: Some(grads),
            lora: None,
            frozen_dw: Vec::new(),
            ready,
        };
        self.pass(k, Base::F32(params), sink, acts, batch, loss_scale)
    }

    /// Forward and backward of the frozen model `base` with LoRA adapters: as
    /// [`Transformer::forward_backward`], with gradients for the adapters only, added into
    /// `grads` (the adapters' layout). No weight gradient of the base model is computed, only
    /// the input gradients through it.
    #[allow(clippy::too_many_arguments)] // forward_backward's arguments and the adapters
    pub fn forward_backward_adapted(
        &self,
        k: &dyn Kernels,
        base: Base,
        adapters: &Adapters,
        grads: &mut [f32],
        acts: &mut Activations,
        batch: Batch,
        loss_scale: f32,
    ) -> Result<f64> {
        self.check_adapters(adapters, acts)?;
        if grads.len() != adapters.params.len() {
            return Err(Error::invalid(
                "gradient buffer does not match the adapters",
            ));
        }
        let sink = GradSink {
            model: None,
            lora: Some((adapters, grads)),
            frozen_dw: Vec::new(),
            ready: None,
        };
        self.pass(k, base, sink, acts, batch, loss_scale)
    }

    fn pass(
        &self,
        k: &dyn Kernels,
        base: Base,
        mut sink: GradSink,
        acts: &mut Activations,
        batch: Batch,
        loss_scale: f32,
    ) -> Result<f64> {
        let counted = self.map_targets(acts, batch.targets)?;
        self.check_inputs(acts, batch.inputs, base.total())?;
        let w = PassWeights::of(&self.layout, base);
        let adapters = sink.lora.as_ref().map(|(a, _)| *a);
        self.forward_with(k, &w, acts, batch.inputs, adapters)?;
        let loss_sum = self.classifier_backward(k, &w, &mut sink, acts, loss_scale, counted)?;
        let lay = &self.layout;
        timed!(
            acts.timings,
            Section::Norms,
            k.rmsnorm_backward(
                &mut acts.dx,
                sink.vector(lay, lay.final_norm),
                &acts.dxn,
                NormSaved {
                    x: &acts.xs[self.cfg.n_layers],
                    w: w.vector(lay.final_norm),
                    rstd: &acts.rstdf,
                },
                self.cfg.dim,
                false,
            )
        )?;
        sink.complete_from(lay.range(lay.final_norm).start);
        // `acts.dx` holds d(loss)/d(residual stream) and flows down through the layers.
        let mut scratch = Vec::new();
        for l in (0..self.cfg.n_layers).rev() {
            let lw = w.layer(l, &mut scratch);
            self.layer_backward(k, &lw, l, &mut sink, acts)?;
            sink.complete_from(lay.layer_start(l));
        }
        drop(scratch);
        if let Some(g) = sink.model.as_deref_mut() {
            timed!(
                acts.timings,
                Section::Embedding,
                k.embedding_backward(
                    lay.view_mut(g, lay.embed),
                    &acts.dx,
                    batch.inputs,
                    self.cfg.dim
                )
            )?;
        }
        sink.complete_from(0);
        Ok(loss_sum / counted.max(1) as f64)
    }

    /// Loss, `dlogits`, the classifier's input gradient (into `acts.dxn`) and weight gradient
    /// (when the model is trained). Returns the loss sum.
    fn classifier_backward(
        &self,
        k: &dyn Kernels,
        w: &PassWeights,
        sink: &mut GradSink,
        acts: &mut Activations,
        loss_scale: f32,
        counted: usize,
    ) -> Result<f64> {
        let t0 = Instant::now();
        let lay = &self.layout;
        let (d, n, vocab_out) = (self.cfg.dim, acts.batch * acts.seq, acts.vocab_out);
        let loss_sum = k.cross_entropy_forward_backward(
            &mut acts.logits,
            &acts.targets,
            vocab_out,
            loss_scale / counted.max(1) as f32,
        )?;
        let dlogits = &acts.logits;
        let cls_id = lay.classifier();
        let s = LinearShape {
            rows: n,
            d_in: d,
            d_out: vocab_out,
        };
        match &self.compaction {
            None => {
                match w {
                    PassWeights::Full(w) => {
                        k.linear_backward_input(&mut acts.dxn, dlogits, w.vector(cls_id), s, false)?
                    }
                    PassWeights::Compact { model, .. } => {
                        self.compact_classifier_backward_input(k, model, acts)?
                    }
                }
                let dlogits = &acts.logits;
                if let Some(g) = sink.model.as_deref_mut() {
                    k.linear_backward_weight(lay.view_mut(g, cls_id), dlogits, &acts.xnf, s)?;
                }
            }
            Some(c) => {
                k.linear_backward_input(&mut acts.dxn, dlogits, &acts.cls_w, s, false)?;
                if let Some(g) = sink.model.as_deref_mut() {
                    acts.cls_dw.fill(0.0);
                    k.linear_backward_weight(&mut acts.cls_dw, dlogits, &acts.xnf, s)?;
                    let g = lay.view_mut(g, cls_id);
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
        }
        acts.timings.add(Section::ClassifierLoss, t0);
        Ok(loss_sum)
    }

    /// Backward through layer `l`: `acts.dx` enters as the gradient of its output and leaves
    /// as the gradient of its input; weight gradients are added into the sink.
    fn layer_backward(
        &self,
        k: &dyn Kernels,
        weights: &Weights,
        l: usize,
        sink: &mut GradSink,
        acts: &mut Activations,
    ) -> Result<()> {
        let w = weights.layer(l);
        self.ffn_backward(k, &w, l, sink, acts)?;
        self.attention_backward(k, weights, &w, l, sink, acts)
    }

    /// `dW += dy^T x` for a base matrix, when the model is trained.
    fn weight_grad(
        &self,
        k: &dyn Kernels,
        sink: &mut GradSink,
        id: TensorId,
        dy: &[f32],
        x: &[f32],
        s: LinearShape,
    ) -> Result<()> {
        match sink.model.as_deref_mut() {
            Some(g) => k.linear_backward_weight(self.layout.view_mut(g, id), dy, x, s),
            None => Ok(()),
        }
    }

    /// The adapter of projection `t` of layer `l`, if any: its weight gradients into the sink,
    /// its input gradient added into `dx`. `x` is the projection's input, `dy` the gradient of
    /// its output.
    #[allow(clippy::too_many_arguments)]
    fn adapter_backward(
        k: &dyn Kernels,
        sink: &mut GradSink,
        lora_acts: Option<&mut LoraActs>,
        l: usize,
        t: LoraTarget,
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
    ) -> Result<()> {
        match (sink.lora.as_mut(), lora_acts) {
            (Some((ad, g)), Some(la)) => lora_pass::backward(k, ad, l, t, x, dy, dx, g, la),
            _ => Ok(()),
        }
    }

    /// Feed-forward block of layer `l`: `x_out = x_mid + down(swiglu(gate(xn2), up(xn2)))`.
    /// `acts.dx` goes from d/d(x_out) to d/d(x_mid).
    fn ffn_backward(
        &self,
        k: &dyn Kernels,
        w: &LayerWeights,
        l: usize,
        sink: &mut GradSink,
        acts: &mut Activations,
    ) -> Result<()> {
        use LoraTarget::{Down, Gate, Up};
        let lt = &self.layout.layers[l];
        let n = acts.batch * acts.seq;
        let la = &acts.layers[l];
        let tm = &mut acts.timings;
        timed!(
            tm,
            Section::FfnBwdDown,
            k.ffn_backward_down(&mut acts.dg, &acts.dx, w.ffn.down, n)
        )?;
        timed!(
            tm,
            Section::WeightGrads,
            self.weight_grad(
                k,
                sink,
                lt.w_down,
                &acts.dx,
                &la.ffn.g,
                w.ffn.down.linear(n)
            )
        )?;
        timed!(tm, Section::Lora, {
            let la_lora = acts.lora.as_mut();
            Self::adapter_backward(k, sink, la_lora, l, Down, &la.ffn.g, &acts.dx, &mut acts.dg)
        })?;
        timed!(
            tm,
            Section::Elementwise,
            k.swiglu_backward(
                &mut acts.dh1,
                &mut acts.dh3,
                &acts.dg,
                &la.ffn.h1,
                &la.ffn.h3
            )
        )?;
        timed!(
            tm,
            Section::FfnBwdGateUp,
            k.ffn_backward_gate_up(&mut acts.dxn, &acts.dh1, &acts.dh3, &w.ffn, n)
        )?;
        timed!(tm, Section::WeightGrads, {
            let (gate, up) = (w.ffn.gate.linear(n), w.ffn.up.linear(n));
            self.weight_grad(k, sink, lt.w_gate, &acts.dh1, &la.xn2, gate)?;
            self.weight_grad(k, sink, lt.w_up, &acts.dh3, &la.xn2, up)
        })?;
        timed!(tm, Section::Lora, {
            let (x, dxn) = (&la.xn2, &mut acts.dxn);
            Self::adapter_backward(k, sink, acts.lora.as_mut(), l, Gate, x, &acts.dh1, dxn)?;
            Self::adapter_backward(k, sink, acts.lora.as_mut(), l, Up, x, &acts.dh3, dxn)
        })?;
        timed!(
            tm,
            Section::Norms,
            k.rmsnorm_backward(
                &mut acts.dx,
                sink.vector(&self.layout, lt.ffn_norm),
                &acts.dxn,
                NormSaved {
                    x: &la.x_mid,
                    w: w.ffn_norm,
                    rstd: &la.rstd2
                },
                self.cfg.dim,
                true,
            )
        )
    }

    /// Attention block of layer `l`: `x_mid = x_in + o_proj(attention(...))`. `acts.dx` goes
    /// from d/d(x_mid) to d/d(x_in).
    fn attention_backward(
        &self,
        k: &dyn Kernels,
        weights: &Weights,
        w: &LayerWeights,
        l: usize,
        sink: &mut GradSink,
        acts: &mut Activations,
    ) -> Result<()> {
        self.attention_core_backward(k, w, l, sink, acts)?;
        let normed = self.qk_norm_backward(k, weights, l, sink, acts)?;
        self.qkv_backward(k, w, l, sink, acts, normed)?;
        self.attention_norm_backward(k, w, l, sink, acts)
    }

    /// From d/d(x_mid) in `acts.dx` through the output projection, attention and RoPE: leaves
    /// the gradients of the (normed) rotated queries and keys in `acts.dq`/`acts.dk` and of the
    /// values in `acts.dv`.
    fn attention_core_backward(
        &self,
        k: &dyn Kernels,
        w: &LayerWeights,
        l: usize,
        sink: &mut GradSink,
        acts: &mut Activations,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let lt = &self.layout.layers[l];
        let n = acts.batch * acts.seq;
        let pos = Positions {
            first: 0,
            period: acts.seq,
        };
        let shape = self.attention_shape(acts.batch, acts.seq);
        let la = &acts.layers[l];
        let tm = &mut acts.timings;
        timed!(
            tm,
            Section::WoBwd,
            k.wo_backward(&mut acts.datt, &acts.dx, w.attn.wo, n)
        )?;
        timed!(
            tm,
            Section::WeightGrads,
            self.weight_grad(k, sink, lt.wo, &acts.dx, &la.attn.att, w.attn.wo.linear(n))
        )?;
        timed!(tm, Section::Lora, {
            let (x, dy) = (&la.attn.att, &acts.dx);
            let o = LoraTarget::O;
            Self::adapter_backward(k, sink, acts.lora.as_mut(), l, o, x, dy, &mut acts.datt)
        })?;
        let g = QkvGrads {
            dq: &mut acts.dq,
            dk: &mut acts.dk,
            dv: &mut acts.dv,
        };
        timed!(
            tm,
            Section::SdpaBwd,
            k.sdpa_backward(g, &acts.datt, &la.attn, &shape)
        )?;
        timed!(tm, Section::Elementwise, {
            k.rope_backward(&mut acts.dq, cfg.n_heads, &self.rope, pos)?;
            k.rope_backward(&mut acts.dk, cfg.n_kv_heads, &self.rope, pos)
        })?;
        Ok(())
    }

    /// Through the per-head query/key norms, when layer `l` has them: the gradients with
    /// respect to the projections' outputs land in `acts.datt` (queries; it is free again) and
    /// `acts.dk_raw` (keys). Returns whether it ran; without the norms, `acts.dq`/`acts.dk`
    /// already hold them.
    fn qk_norm_backward(
        &self,
        k: &dyn Kernels,
        weights: &Weights,
        l: usize,
        sink: &mut GradSink,
        acts: &mut Activations,
    ) -> Result<bool> {
        let (lay, lt) = (&self.layout, &self.layout.layers[l]);
        let (Some(qn), Some(kn)) = (lt.q_norm, lt.k_norm) else {
            return Ok(false);
        };
        let hd = self.cfg.head_dim;
        let a = &acts.layers[l].attn;
        let tm = &mut acts.timings;
        timed!(tm, Section::Norms, {
            let q_saved = NormSaved {
                x: &a.q_raw,
                w: weights.vector(qn),
                rstd: &a.rstd_q,
            };
            let k_saved = NormSaved {
                x: &a.k_raw,
                w: weights.vector(kn),
                rstd: &a.rstd_k,
            };
            k.rmsnorm_backward(
                &mut acts.datt,
                sink.vector(lay, qn),
                &acts.dq,
                q_saved,
                hd,
                false,
            )?;
            k.rmsnorm_backward(
                &mut acts.dk_raw,
                sink.vector(lay, kn),
                &acts.dk,
                k_saved,
                hd,
                false,
            )
        })?;
        Ok(true)
    }

    /// Through the query, key and value projections: d/d(xn1) into `acts.dxn`, and the
    /// projections' weight gradients. `normed` says where [`Self::qk_norm_backward`] left the
    /// gradients of the query and key projections' outputs.
    fn qkv_backward(
        &self,
        k: &dyn Kernels,
        w: &LayerWeights,
        l: usize,
        sink: &mut GradSink,
        acts: &mut Activations,
        normed: bool,
    ) -> Result<()> {
        let lt = &self.layout.layers[l];
        let n = acts.batch * acts.seq;
        let la = &acts.layers[l];
        let tm = &mut acts.timings;
        let (dq_proj, dk_proj): (&[f32], &[f32]) = if normed {
            (&acts.datt, &acts.dk_raw)
        } else {
            (&acts.dq, &acts.dk)
        };
        timed!(
            tm,
            Section::QBwd,
            k.q_backward(&mut acts.dxn, dq_proj, w.attn.wq, n)
        )?;
        timed!(
            tm,
            Section::KvBwd,
            k.kv_backward(&mut acts.dxn, dk_proj, &acts.dv, &w.attn, n)
        )?;
        timed!(tm, Section::WeightGrads, {
            let a = &w.attn;
            let xn1 = &la.xn1;
            self.weight_grad(k, sink, lt.wq, dq_proj, xn1, a.wq.linear(n))?;
            self.weight_grad(k, sink, lt.wk, dk_proj, xn1, a.wk.linear(n))?;
            self.weight_grad(k, sink, lt.wv, &acts.dv, xn1, a.wv.linear(n))
        })?;
        timed!(tm, Section::Lora, {
            use LoraTarget::{K, Q, V};
            let (x, dxn) = (&la.xn1, &mut acts.dxn);
            Self::adapter_backward(k, sink, acts.lora.as_mut(), l, Q, x, dq_proj, dxn)?;
            Self::adapter_backward(k, sink, acts.lora.as_mut(), l, K, x, dk_proj, dxn)?;
            Self::adapter_backward(k, sink, acts.lora.as_mut(), l, V, x, &acts.dv, dxn)
        })
    }

    /// Through the attention's input norm: `acts.dx` goes from d/d(x_mid) to d/d(x_in), adding
    /// the gradient that came through the attention (`acts.dxn`) to the residual one.
    fn attention_norm_backward(
        &self,
        k: &dyn Kernels,
        w: &LayerWeights,
        l: usize,
        sink: &mut GradSink,
        acts: &mut Activations,
    ) -> Result<()> {
        let lt = &self.layout.layers[l];
        let la = &acts.layers[l];
        timed!(
            acts.timings,
            Section::Norms,
            k.rmsnorm_backward(
                &mut acts.dx,
                sink.vector(&self.layout, lt.attn_norm),
                &acts.dxn,
                NormSaved {
                    x: &acts.xs[l],
                    w: w.attn_norm,
                    rstd: &la.rstd1
                },
                self.cfg.dim,
                true,
            )
        )
    }
}
