//! Parameters: one contiguous f32 buffer with named views (Hugging Face tensor names).
//!
//! The same [`ParamLayout`] describes the weights, the gradients and each Adam moment, so the
//! optimizer, gradient clipping, zeroing and checkpointing are single loops over flat buffers.

use std::ops::Range;

use super::config::ModelConfig;
use crate::util::rng::Rng;

/// Index of a tensor in a [`ParamLayout`].
pub type TensorId = usize;

/// What a tensor is, which decides its initialisation and weight decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorKind {
    /// Token embedding (also the classifier when tied).
    Embedding,
    /// A projection matrix `[out, in]`.
    Matrix,
    /// A projection that writes into the residual stream (`o_proj`, `down_proj`).
    ResidualMatrix,
    /// An untied classifier `[vocab, dim]`.
    Classifier,
    /// An RMSNorm gain vector.
    NormGain,
}

/// One named tensor inside the flat buffer.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    /// Hugging Face name, e.g. `model.layers.3.self_attn.q_proj.weight`.
    pub name: String,
    /// Row-major shape (`[out, in]` for matrices).
    pub shape: Vec<usize>,
    /// Start within the flat buffer.
    pub offset: usize,
    pub kind: TensorKind,
}

impl TensorSpec {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element range inside the flat buffer.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len()
    }

    /// Whether AdamW applies weight decay (matrices and embeddings yes, norm gains no).
    pub fn decays(&self) -> bool {
        self.kind != TensorKind::NormGain
    }
}

/// Tensor ids of one transformer layer.
#[derive(Debug, Clone, Copy)]
pub struct LayerTensors {
    pub attn_norm: TensorId,
    pub wq: TensorId,
    pub wk: TensorId,
    pub wv: TensorId,
    pub wo: TensorId,
    pub q_norm: Option<TensorId>,
    pub k_norm: Option<TensorId>,
    pub ffn_norm: TensorId,
    pub w_gate: TensorId,
    pub w_up: TensorId,
    pub w_down: TensorId,
}

/// The layout of all parameters of a model in one flat buffer.
#[derive(Debug, Clone)]
pub struct ParamLayout {
    pub tensors: Vec<TensorSpec>,
    pub embed: TensorId,
    pub layers: Vec<LayerTensors>,
    pub final_norm: TensorId,
    /// The untied classifier, if any; with tied embeddings the classifier is `embed`.
    pub lm_head: Option<TensorId>,
    total: usize,
}

impl ParamLayout {
    /// The layout for a configuration, in Hugging Face order.
    pub fn new(cfg: &ModelConfig) -> Self {
        let mut b = LayoutBuilder::default();
        let d = cfg.dim;
        let embed = b.add(
            "model.embed_tokens.weight".into(),
            vec![cfg.vocab_size, d],
            TensorKind::Embedding,
        );
        let layers = (0..cfg.n_layers).map(|l| b.layer(cfg, l)).collect();
        let final_norm = b.add("model.norm.weight".into(), vec![d], TensorKind::NormGain);
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(b.add(
                "lm_head.weight".into(),
                vec![cfg.vocab_size, d],
                TensorKind::Classifier,
            ))
        };
        ParamLayout {
            tensors: b.tensors,
            embed,
            layers,
            final_norm,
            lm_head,
            total: b.offset,
        }
    }

    /// Total number of f32 elements.
    pub fn total(&self) -> usize {
        self.total
    }

    /// The offset where layer `l`'s tensors begin (they lie together, layer after layer).
    pub fn layer_start(&self, l: usize) -> usize {
        self.tensors[self.layers[l].attn_norm].offset
    }

    /// The offsets from which every gradient is complete, in the order the backward pass
    /// reaches them: after the classifier and the final norm, everything from the final norm
    /// on (the untied classifier lies after it); after layer `l`, everything from layer `l`'s
    /// first tensor on; after the embedding, everything (0). With tied embeddings the
    /// classifier's gradient is the embedding's, complete only at the end.
    pub fn backward_ready_points(&self) -> Vec<usize> {
        let mut points = vec![self.tensors[self.final_norm].offset];
        points.extend((0..self.layers.len()).rev().map(|l| self.layer_start(l)));
        points.push(0);
        points
    }

    /// The classifier tensor (the embedding when tied).
    pub fn classifier(&self) -> TensorId {
        self.lm_head.unwrap_or(self.embed)
    }

    /// The element range of a tensor.
    pub fn range(&self, id: TensorId) -> Range<usize> {
        self.tensors[id].range()
    }

    /// A tensor's view of a flat buffer.
    pub fn view<'a>(&self, buf: &'a [f32], id: TensorId) -> &'a [f32] {
        &buf[self.range(id)]
    }

    /// A tensor's mutable view of a flat buffer.
    pub fn view_mut<'a>(&self, buf: &'a mut [f32], id: TensorId) -> &'a mut [f32] {
        &mut buf[self.range(id)]
    }

    /// The first tensor (in layout order) of `buf` holding a NaN or an infinity, with how
    /// many of its values are not finite.
    pub fn first_non_finite(&self, buf: &[f32]) -> Option<(&str, usize)> {
        first_non_finite(&self.tensors, buf)
    }

    /// Looks a tensor up by its Hugging Face name.
    pub fn find(&self, name: &str) -> Option<TensorId> {
        self.tensors.iter().position(|t| t.name == name)
    }

    /// Fresh parameters: normal(0, 0.02) for matrices and embeddings, residual projections
    /// additionally scaled by `1/sqrt(2 * layers)`, norm gains 1. The same seed gives the same
    /// weights on every machine.
    pub fn init(&self, n_layers: usize, seed: u64) -> Vec<f32> {
        let mut buf = vec![0.0f32; self.total];
        let residual_scale = 1.0 / (2.0 * n_layers.max(1) as f64).sqrt();
        for (i, t) in self.tensors.iter().enumerate() {
            let dst = &mut buf[t.range()];
            let std = match t.kind {
                TensorKind::NormGain => {
                    dst.fill(1.0);
                    continue;
                }
                TensorKind::ResidualMatrix => 0.02 * residual_scale,
                TensorKind::Embedding | TensorKind::Matrix | TensorKind::Classifier => 0.02,
            };
            // One stream per tensor, so a tensor's values do not depend on the others' sizes.
            let mut rng = Rng::new(seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i as u64 + 1)));
            for x in dst.iter_mut() {
                *x = (rng.normal() * std) as f32;
            }
        }
        buf
    }
}

/// The first of `tensors` whose values in `buf` hold a NaN or an infinity, with how many of
/// its values are not finite.
pub fn first_non_finite<'t>(tensors: &'t [TensorSpec], buf: &[f32]) -> Option<(&'t str, usize)> {
    tensors.iter().find_map(|t| {
        let v = buf.get(t.range())?;
        let bad = v.iter().filter(|x| !x.is_finite()).count();
        (bad > 0).then_some((t.name.as_str(), bad))
    })
}

/// Lays tensors out one after another in the flat parameter vector.
#[derive(Default)]
struct LayoutBuilder {
    tensors: Vec<TensorSpec>,
    offset: usize,
}

impl LayoutBuilder {
    fn add(&mut self, name: String, shape: Vec<usize>, kind: TensorKind) -> TensorId {
        let spec = TensorSpec {
            name,
            shape,
            offset: self.offset,
            kind,
        };
        self.offset += spec.len();
        self.tensors.push(spec);
        self.tensors.len() - 1
    }

    /// The tensors of layer `l`, in Hugging Face order.
    fn layer(&mut self, cfg: &ModelConfig, l: usize) -> LayerTensors {
        let (d, q, kv, f, hd) = (
            cfg.dim,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.ffn_dim,
            cfg.head_dim,
        );
        let p = format!("model.layers.{l}");
        let attn_norm = self.add(
            format!("{p}.input_layernorm.weight"),
            vec![d],
            TensorKind::NormGain,
        );
        let wq = self.add(
            format!("{p}.self_attn.q_proj.weight"),
            vec![q, d],
            TensorKind::Matrix,
        );
        let wk = self.add(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv, d],
            TensorKind::Matrix,
        );
        let wv = self.add(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv, d],
            TensorKind::Matrix,
        );
        let wo = self.add(
            format!("{p}.self_attn.o_proj.weight"),
            vec![d, q],
            TensorKind::ResidualMatrix,
        );
        let (q_norm, k_norm) = if cfg.qk_norm() {
            (
                Some(self.add(
                    format!("{p}.self_attn.q_norm.weight"),
                    vec![hd],
                    TensorKind::NormGain,
                )),
                Some(self.add(
                    format!("{p}.self_attn.k_norm.weight"),
                    vec![hd],
                    TensorKind::NormGain,
                )),
            )
        } else {
            (None, None)
        };
        let ffn_norm = self.add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![d],
            TensorKind::NormGain,
        );
        let w_gate = self.add(
            format!("{p}.mlp.gate_proj.weight"),
            vec![f, d],
            TensorKind::Matrix,
        );
        let w_up = self.add(
            format!("{p}.mlp.up_proj.weight"),
            vec![f, d],
            TensorKind::Matrix,
        );
        let w_down = self.add(
            format!("{p}.mlp.down_proj.weight"),
            vec![d, f],
            TensorKind::ResidualMatrix,
        );
        LayerTensors {
            attn_norm,
            wq,
            wk,
            wv,
            wo,
            q_norm,
            k_norm,
            ffn_norm,
            w_gate,
            w_up,
            w_down,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_counts_and_names() {
        for name in ["tiny", "stories15m", "qwen3-0.6b"] {
            let cfg = ModelConfig::preset(name).unwrap();
            let layout = ParamLayout::new(&cfg);
            assert_eq!(layout.total(), cfg.param_counts().total, "{name}");
            let mut end = 0;
            for t in &layout.tensors {
                assert_eq!(t.offset, end);
                end += t.len();
            }
        }
        let cfg = ModelConfig::preset("qwen3-0.6b").unwrap();
        let layout = ParamLayout::new(&cfg);
        let id = layout
            .find("model.layers.3.self_attn.q_proj.weight")
            .unwrap();
        assert_eq!(layout.tensors[id].shape, vec![2048, 1024]);
        assert!(
            layout
                .find("model.layers.27.self_attn.k_norm.weight")
                .is_some()
        );
        assert!(layout.find("lm_head.weight").is_none());
    }

    #[test]
    fn init_is_reproducible_and_has_the_right_statistics() {
        let mut cfg = ModelConfig::preset("tiny").unwrap();
        cfg.dim = 64;
        cfg.head_dim = 16;
        let layout = ParamLayout::new(&cfg);
        let a = layout.init(cfg.n_layers, 7);
        assert_eq!(a, layout.init(cfg.n_layers, 7));
        assert_ne!(a, layout.init(cfg.n_layers, 8));
        let std = |id: TensorId| {
            let v = layout.view(&a, id);
            (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
        };
        assert!((std(layout.embed) - 0.02).abs() < 0.002);
        let expect = 0.02 / (2.0 * cfg.n_layers as f64).sqrt();
        assert!((std(layout.layers[0].wo) - expect).abs() < 0.002);
        assert!(layout.view(&a, layout.final_norm).iter().all(|&x| x == 1.0));
    }
}
