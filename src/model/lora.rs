//! LoRA adapters: low-rank updates of a frozen model's projections.
//!
//! An adapted projection computes `y = x W^T + (alpha / r) * (drop(x) A^T) B^T` with the base
//! matrix `W [out, in]` frozen and only `A [r, in]` and `B [out, r]` trained. `A` starts
//! Kaiming-uniform (bound `1/sqrt(in)`, as PEFT's `kaiming_uniform_(a=sqrt(5))`) and `B` at
//! zero, so a fresh adapter leaves the model unchanged.
//!
//! The adapters live in one flat f32 buffer described by [`LoraLayout`] (so AdamW, clipping and
//! checkpoints stay single loops over flat buffers, as for a full model), with PEFT's tensor
//! names (`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`): the saved file is
//! what `PeftModel.from_pretrained` loads.
//!
//! The forward and backward products of an adapter are in [`crate::model::lora_pass`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::config::ModelConfig;
use super::params::{ParamLayout, TensorId};
use crate::error::{Error, Result};
use crate::util::rng::Rng;

/// A projection an adapter can attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    /// Every target, in the order of a layer's forward pass.
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// Position in [`LoraTarget::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The Hugging Face module name (`q_proj`, ..., `down_proj`).
    pub fn module(self) -> &'static str {
        match self {
            LoraTarget::Q => "q_proj",
            LoraTarget::K => "k_proj",
            LoraTarget::V => "v_proj",
            LoraTarget::O => "o_proj",
            LoraTarget::Gate => "gate_proj",
            LoraTarget::Up => "up_proj",
            LoraTarget::Down => "down_proj",
        }
    }

    /// The module's parent within a layer (`self_attn` or `mlp`).
    pub fn block(self) -> &'static str {
        match self {
            LoraTarget::Q | LoraTarget::K | LoraTarget::V | LoraTarget::O => "self_attn",
            LoraTarget::Gate | LoraTarget::Up | LoraTarget::Down => "mlp",
        }
    }

    /// `(in, out)` widths of the projection in a model.
    pub fn shape(self, cfg: &ModelConfig) -> (usize, usize) {
        let (d, q, kv, f) = (cfg.dim, cfg.q_dim(), cfg.kv_dim(), cfg.ffn_dim);
        match self {
            LoraTarget::Q => (d, q),
            LoraTarget::K | LoraTarget::V => (d, kv),
            LoraTarget::O => (q, d),
            LoraTarget::Gate | LoraTarget::Up => (d, f),
            LoraTarget::Down => (f, d),
        }
    }

    /// The base matrix this target adapts, in a model's parameter layout.
    pub fn base_tensor(self, layout: &ParamLayout, layer: usize) -> TensorId {
        let l = &layout.layers[layer];
        match self {
            LoraTarget::Q => l.wq,
            LoraTarget::K => l.wk,
            LoraTarget::V => l.wv,
            LoraTarget::O => l.wo,
            LoraTarget::Gate => l.w_gate,
            LoraTarget::Up => l.w_up,
            LoraTarget::Down => l.w_down,
        }
    }

    /// Parses a list like `q,k,v,o`, `q_proj,v_proj` or `all-linear` (every projection of
    /// every layer; the classifier is never adapted).
    pub fn parse_list(s: &str) -> Result<Vec<LoraTarget>> {
        let s = s.trim();
        if s == "all-linear" || s == "all" {
            return Ok(LoraTarget::ALL.to_vec());
        }
        let mut out: Vec<LoraTarget> = s
            .split(',')
            .map(|p| p.trim().parse())
            .collect::<Result<_>>()?;
        out.sort();
        out.dedup();
        if out.is_empty() {
            return Err(Error::invalid("--lora-targets names no projection"));
        }
        Ok(out)
    }
}

impl FromStr for LoraTarget {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let t = match s.trim_end_matches("_proj") {
            "q" => LoraTarget::Q,
            "k" => LoraTarget::K,
            "v" => LoraTarget::V,
            "o" => LoraTarget::O,
            "gate" => LoraTarget::Gate,
            "up" => LoraTarget::Up,
            "down" => LoraTarget::Down,
            _ => {
                return Err(Error::invalid(format!(
                    "unknown LoRA target '{s}': use q, k, v, o, gate, up, down (or their \
                     *_proj names), comma-separated, or all-linear"
                )));
            }
        };
        Ok(t)
    }
}

impl fmt::Display for LoraTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.module().trim_end_matches("_proj"))
    }
}

/// How a model is adapted: rank, scale, which projections, dropout on the adapters' input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Sorted, without repeats.
    pub targets: Vec<LoraTarget>,
    /// Probability of zeroing an input element of the adapter (training only).
    pub dropout: f64,
}

impl LoraConfig {
    /// Checks the values a user chose.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::invalid("--lora-rank must be at least 1"));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::invalid("--lora-alpha must be a positive number"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid("--lora-dropout must be in [0, 1)"));
        }
        if self.targets.is_empty() {
            return Err(Error::invalid("--lora-targets names no projection"));
        }
        Ok(())
    }

    /// The factor of the low-rank product, `alpha / rank`.
    pub fn scale(&self) -> f32 {
        (self.alpha / self.rank as f64) as f32
    }

    /// Whether projection `t` is adapted.
    pub fn adapts(&self, t: LoraTarget) -> bool {
        self.targets.contains(&t)
    }
}

/// The `A` and `B` tensors of one adapted projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdapterIds {
    /// `A [rank, in]`.
    pub a: TensorId,
    /// `B [out, rank]`.
    pub b: TensorId,
    pub d_in: usize,
    pub d_out: usize,
}

/// The layout of every adapter of a model in one flat buffer.
#[derive(Debug, Clone)]
pub struct LoraLayout {
    pub cfg: LoraConfig,
    /// Names (PEFT's), shapes and offsets; reuses the parameter layout's tensor record.
    pub tensors: Vec<super::params::TensorSpec>,
    /// `[layer][target index]`: the adapter of that projection, if adapted.
    pub layers: Vec<[Option<AdapterIds>; 7]>,
    total: usize,
}

/// PEFT's name of an adapter tensor (`which` is `lora_A` or `lora_B`).
pub fn peft_name(layer: usize, t: LoraTarget, which: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}.{which}.weight",
        t.block(),
        t.module()
    )
}

impl LoraLayout {
    /// The adapters of `lora` for a model of configuration `model`, layer after layer, each
    /// layer's projections in forward order, `A` before `B`.
    pub fn new(model: &ModelConfig, lora: LoraConfig) -> Result<Self> {
        lora.validate()?;
        let mut tensors = Vec::new();
        let mut layers = Vec::with_capacity(model.n_layers);
        let mut offset = 0;
        let mut add = |name: String, shape: Vec<usize>| {
            let spec = super::params::TensorSpec {
                name,
                offset,
                kind: super::params::TensorKind::Matrix,
                shape,
            };
            offset += spec.len();
            tensors.push(spec);
            tensors.len() - 1
        };
        for l in 0..model.n_layers {
            let mut ids = [None; 7];
            for &t in &lora.targets {
                let (d_in, d_out) = t.shape(model);
                let a = add(peft_name(l, t, "lora_A"), vec![lora.rank, d_in]);
                let b = add(peft_name(l, t, "lora_B"), vec![d_out, lora.rank]);
                ids[t.index()] = Some(AdapterIds { a, b, d_in, d_out });
            }
            layers.push(ids);
        }
        Ok(LoraLayout {
            cfg: lora,
            tensors,
            layers,
            total: offset,
        })
    }

    /// Total number of f32 elements (the trainable parameters).
    pub fn total(&self) -> usize {
        self.total
    }

    /// A tensor's view of a flat buffer.
    pub fn view<'a>(&self, buf: &'a [f32], id: TensorId) -> &'a [f32] {
        &buf[self.tensors[id].range()]
    }

    /// A tensor's mutable view of a flat buffer.
    pub fn view_mut<'a>(&self, buf: &'a mut [f32], id: TensorId) -> &'a mut [f32] {
        &mut buf[self.tensors[id].range()]
    }

    /// Looks a tensor up by its PEFT name.
    pub fn find(&self, name: &str) -> Option<TensorId> {
        self.tensors.iter().position(|t| t.name == name)
    }

    /// Fresh adapters: every `A` Kaiming-uniform in `[-1/sqrt(in), 1/sqrt(in)]`, every `B`
    /// zero. The same seed gives the same values on every machine.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut buf = vec![0.0f32; self.total];
        for (i, ids) in self.layers.iter().flatten().flatten().enumerate() {
            let bound = 1.0 / (ids.d_in as f64).sqrt();
            let mut rng = Rng::new(seed ^ (0xA24B_AED4_963E_E407u64.wrapping_mul(i as u64 + 1)));
            for x in self.view_mut(&mut buf, ids.a) {
                *x = ((rng.uniform() * 2.0 - 1.0) * bound) as f32;
            }
        }
        buf
    }

    /// `W + (alpha / r) B A` for every adapted matrix, written into a copy of the base
    /// parameters: the merged model computes what base and adapters compute together.
    pub fn merge(&self, base_layout: &ParamLayout, base: &[f32], adapters: &[f32]) -> Vec<f32> {
        let mut merged = base.to_vec();
        let (r, s) = (self.cfg.rank, self.cfg.scale());
        for (l, ids) in self.layers.iter().enumerate() {
            for t in LoraTarget::ALL {
                let Some(ad) = ids[t.index()] else { continue };
                let w = base_layout.view_mut(&mut merged, t.base_tensor(base_layout, l));
                let (a, b) = (self.view(adapters, ad.a), self.view(adapters, ad.b));
                for (o, w_row) in w.chunks_exact_mut(ad.d_in).enumerate() {
                    let b_row = &b[o * r..(o + 1) * r];
                    for (j, &bj) in b_row.iter().enumerate() {
                        let f = s * bj;
                        if f == 0.0 {
                            continue;
                        }
                        for (wx, &ax) in w_row.iter_mut().zip(&a[j * ad.d_in..(j + 1) * ad.d_in]) {
                            *wx += f * ax;
                        }
                    }
                }
            }
        }
        merged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        ModelConfig::preset("tiny").unwrap()
    }

    #[test]
    fn targets_parse_and_name_like_peft() {
        assert_eq!(
            LoraTarget::parse_list("v,q_proj, q").unwrap(),
            vec![LoraTarget::Q, LoraTarget::V]
        );
        assert_eq!(LoraTarget::parse_list("all-linear").unwrap().len(), 7);
        assert!(LoraTarget::parse_list("qq").is_err());
        assert_eq!(
            peft_name(3, LoraTarget::Gate, "lora_B"),
            "base_model.model.model.layers.3.mlp.gate_proj.lora_B.weight"
        );
    }

    #[test]
    fn layout_covers_every_adapter_and_init_starts_at_the_base_model() {
        let m = cfg();
        let lora = LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: LoraTarget::ALL.to_vec(),
            dropout: 0.0,
        };
        let lay = LoraLayout::new(&m, lora).unwrap();
        let per_layer: usize = LoraTarget::ALL
            .iter()
            .map(|t| {
                let (i, o) = t.shape(&m);
                4 * (i + o)
            })
            .sum();
        assert_eq!(lay.total(), per_layer * m.n_layers);
        let buf = lay.init(1);
        let ids = lay.layers[0][LoraTarget::Up.index()].unwrap();
        assert!(lay.view(&buf, ids.b).iter().all(|&x| x == 0.0));
        let bound = 1.0 / (ids.d_in as f32).sqrt();
        let a = lay.view(&buf, ids.a);
        assert!(a.iter().all(|x| x.abs() <= bound) && a.iter().any(|&x| x != 0.0));
        // B = 0: merging changes nothing.
        let base_layout = ParamLayout::new(&m);
        let base = base_layout.init(m.n_layers, 3);
        assert_eq!(lay.merge(&base_layout, &base, &buf), base);
    }
}
