//! A frozen model held compactly (`--base-weights bf16|q8`, the QLoRA idea): the model a LoRA
//! run adapts gets no gradients and no optimizer state, so its matrices need not be f32.
//! Vectors (norm gains) stay f32; every matrix is kept as bf16 or as int8 in groups along its
//! rows with an f32 scale per group (Q8_0, `backend::cpu::quant`). A pass expands one layer at a
//! time into an f32 scratch buffer laid out as that layer's part of the parameter layout (so
//! the kernels see ordinary f32 weights), and reads the embedding and the classifier a block of
//! rows at a time.

use std::ops::Range;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::params::{ParamLayout, TensorId};
use crate::backend::cpu::quant::{Q8Tensor, group_for};

/// Elements expanded per parallel task.
const EXPAND_BLOCK: usize = 1 << 16;

/// How a LoRA run holds its frozen model's matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BaseFormat {
    /// f32, as trained (4 bytes per weight).
    #[default]
    F32,
    /// bf16 (2 bytes per weight; 8 significant bits).
    Bf16,
    /// int8 in groups along each row with one f32 scale per group (Q8_0; ~1.06 bytes per
    /// weight at groups of 64).
    Q8,
}

/// One matrix, compactly.
#[derive(Debug, Clone)]
enum Compact {
    Bf16(Vec<u16>),
    Q8(Q8Tensor),
}

/// A frozen model with compact matrices.
#[derive(Debug, Clone)]
pub struct FrozenModel {
    pub format: BaseFormat,
    /// Per tensor: its f32 values (vectors) or its compact copy (matrices).
    vectors: Vec<Option<Vec<f32>>>,
    matrices: Vec<Option<Compact>>,
    /// Elements of the model (the f32 layout's total).
    total: usize,
}

fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

fn bf16_value(b: u16) -> f32 {
    half::bf16::from_bits(b).to_f32()
}

impl FrozenModel {
    /// The compact copy of `params` (laid out as `layout`) in `format` (`Bf16` or `Q8`).
    pub fn new(layout: &ParamLayout, params: &[f32], format: BaseFormat) -> Self {
        let cols: Vec<usize> = layout
            .tensors
            .iter()
            .filter(|t| t.shape.len() == 2)
            .map(|t| t.shape[1])
            .collect();
        let group = group_for(&cols);
        let (mut vectors, mut matrices) = (Vec::new(), Vec::new());
        for t in &layout.tensors {
            let v = &params[t.range()];
            if t.shape.len() == 2 && format != BaseFormat::F32 {
                vectors.push(None);
                matrices.push(Some(match format {
                    BaseFormat::Q8 => Compact::Q8(Q8Tensor::quantize(v, group)),
                    _ => Compact::Bf16(v.iter().map(|&x| bf16_bits(x)).collect()),
                }));
            } else {
                vectors.push(Some(v.to_vec()));
                matrices.push(None);
            }
        }
        FrozenModel {
            format,
            vectors,
            matrices,
            total: layout.total(),
        }
    }

    /// Elements of the model.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let v: usize = self.vectors.iter().flatten().map(|v| 4 * v.len()).sum();
        let m: usize = self
            .matrices
            .iter()
            .flatten()
            .map(|c| match c {
                Compact::Bf16(b) => 2 * b.len(),
                Compact::Q8(q) => q.q.len() + 4 * q.scales.len(),
            })
            .sum();
        v + m
    }

    /// Bytes a model of `total` elements with `matrix` of them in matrices takes in `format`.
    pub fn bytes_for(format: BaseFormat, total: usize, matrix: usize) -> usize {
        let vectors = 4 * (total - matrix);
        vectors
            + match format {
                BaseFormat::F32 => 4 * matrix,
                BaseFormat::Bf16 => 2 * matrix,
                // Groups of at least 32: one f32 scale per 32 values at most.
                BaseFormat::Q8 => matrix + matrix / 8,
            }
    }

    /// The f32 values of a vector (a norm gain).
    pub fn vector(&self, id: TensorId) -> &[f32] {
        self.vectors[id].as_deref().unwrap_or(&[])
    }

    /// Writes elements `range` (within tensor `id`, row-major) as f32 into `dst`, in parallel
    /// over blocks of elements.
    pub fn expand(&self, id: TensorId, range: Range<usize>, dst: &mut [f32]) {
        if let Some(v) = &self.vectors[id] {
            dst.copy_from_slice(&v[range]);
            return;
        }
        match &self.matrices[id] {
            Some(Compact::Bf16(b)) => {
                let src = &b[range];
                dst.par_chunks_mut(EXPAND_BLOCK)
                    .zip(src.par_chunks(EXPAND_BLOCK))
                    .for_each(|(d, s)| {
                        for (d, &x) in d.iter_mut().zip(s) {
                            *d = bf16_value(x);
                        }
                    });
            }
            Some(Compact::Q8(q)) => {
                // Blocks start on group boundaries when the range does (whole rows, layers).
                let g = q.group;
                let start = range.start;
                dst.par_chunks_mut(EXPAND_BLOCK)
                    .enumerate()
                    .for_each(|(b, d)| {
                        let first = start + b * EXPAND_BLOCK;
                        if first.is_multiple_of(g) {
                            // Whole groups: one scale per run of `g` values.
                            let qs = &q.q[first..first + d.len()];
                            for (k, (dg, qg)) in d.chunks_mut(g).zip(qs.chunks(g)).enumerate() {
                                let s = q.scales[first / g + k];
                                for (x, &v) in dg.iter_mut().zip(qg) {
                                    *x = v as f32 * s;
                                }
                            }
                        } else {
                            for (j, d) in d.iter_mut().enumerate() {
                                let i = first + j;
                                *d = q.q[i] as f32 * q.scales[i / g];
                            }
                        }
                    });
            }
            None => dst.fill(0.0),
        }
    }

    /// The whole model as f32 (what the compact copy stands for).
    pub fn to_f32(&self, layout: &ParamLayout) -> Vec<f32> {
        let mut out = vec![0.0f32; self.total];
        for (id, t) in layout.tensors.iter().enumerate() {
            self.expand(id, 0..t.len(), &mut out[t.range()]);
        }
        out
    }

    /// Expands the tensors of layer `l` into `scratch`, laid out as their part of the layout
    /// (from the layer's first tensor to its last); returns the offset of that part.
    pub fn expand_layer(&self, layout: &ParamLayout, l: usize, scratch: &mut Vec<f32>) -> usize {
        let span = layer_span(layout, l);
        scratch.resize(span.len(), 0.0);
        for (id, t) in layout.tensors.iter().enumerate() {
            let r = t.range();
            if r.start >= span.start && r.end <= span.end {
                let dst = &mut scratch[r.start - span.start..r.end - span.start];
                self.expand(id, 0..t.len(), dst);
            }
        }
        span.start
    }
}

/// The element range of layer `l`'s tensors in the layout (they are consecutive).
pub fn layer_span(layout: &ParamLayout, l: usize) -> Range<usize> {
    let lt = &layout.layers[l];
    let ids = [
        Some(lt.attn_norm),
        Some(lt.wq),
        Some(lt.wk),
        Some(lt.wv),
        Some(lt.wo),
        lt.q_norm,
        lt.k_norm,
        Some(lt.ffn_norm),
        Some(lt.w_gate),
        Some(lt.w_up),
        Some(lt.w_down),
    ];
    let ranges: Vec<Range<usize>> = ids.iter().flatten().map(|&id| layout.range(id)).collect();
    let start = ranges.iter().map(|r| r.start).min().unwrap_or(0);
    let end = ranges.iter().map(|r| r.end).max().unwrap_or(0);
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    #[test]
    fn compact_copies_stand_for_the_weights_within_their_rounding() {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let layout = ParamLayout::new(&cfg);
        let params = layout.init(cfg.n_layers, 3);
        for (format, rel) in [
            (BaseFormat::Bf16, 1.0 / 256.0),
            (BaseFormat::Q8, 1.0 / 127.0),
        ] {
            let f = FrozenModel::new(&layout, &params, format);
            let back = f.to_f32(&layout);
            for t in &layout.tensors {
                let (a, b) = (&params[t.range()], &back[t.range()]);
                if t.shape.len() == 1 {
                    assert_eq!(a, b, "vectors stay exact");
                    continue;
                }
                // bf16: half a unit in the 8th bit of each value; Q8: half a step of the
                // group's scale (max |x| / 127).
                let max = a.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                for (x, y) in a.iter().zip(b) {
                    let bound = match format {
                        BaseFormat::Bf16 => x.abs() * rel,
                        _ => max * rel,
                    };
                    assert!(
                        (x - y).abs() <= bound + 1e-12,
                        "{format:?} {}: {x} vs {y}",
                        t.name
                    );
                }
            }
            assert!(f.bytes() < 4 * layout.total() / 2 + 4 * 1024);
            // A layer's expansion is its part of the full expansion.
            let mut scratch = Vec::new();
            let start = f.expand_layer(&layout, 1, &mut scratch);
            assert_eq!(&back[start..start + scratch.len()], &scratch[..]);
        }
    }
}
