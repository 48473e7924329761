//! The parameters of a model as the kernels receive them: typed views of one flat buffer
//! (and, for inference with `--weights bf16|q8`, of a compact copy of its matrices).

use super::params::{ParamLayout, TensorId};
use crate::backend::cpu::gemv::to_bf16;
use crate::backend::cpu::quant::{Q8Tensor, group_for};
use crate::backend::{AttentionWeights, CompactWeights, FfnWeights, Matrix};

/// A compact copy of a model's matrices for inference (vectors stay f32).
#[derive(Debug, Clone)]
pub enum CompactParams {
    /// Every parameter as bf16 bits, in the layout of the f32 buffer.
    Bf16(Vec<u16>),
    /// Every matrix as int8 groups along its rows (Q8_0), indexed by tensor id.
    Q8 {
        tensors: Vec<Option<Q8Tensor>>,
        group: usize,
    },
}

impl CompactParams {
    /// A bf16 copy of `params`.
    pub fn bf16(params: &[f32]) -> Self {
        CompactParams::Bf16(to_bf16(params))
    }

    /// The matrices of `params` quantised in groups of the largest power of two up to 64 that
    /// divides every matrix's row length.
    pub fn q8(layout: &ParamLayout, params: &[f32]) -> Self {
        let cols: Vec<usize> = layout
            .tensors
            .iter()
            .filter(|t| t.shape.len() == 2)
            .map(|t| t.shape[1])
            .collect();
        let group = group_for(&cols);
        let tensors = layout
            .tensors
            .iter()
            .map(|t| {
                (t.shape.len() == 2).then(|| {
                    let q = Q8Tensor::quantize(&params[t.range()], group);
                    // The layout of the prompt's products too, made here with the rest of
                    // the copy rather than inside the first prompt.
                    q.prepare_products(t.shape[0], t.shape[1]);
                    q
                })
            })
            .collect();
        CompactParams::Q8 { tensors, group }
    }

    /// Whether this is an int8 copy whose matrices carry the packed layout of the products of
    /// several rows (made where the CPU runs them: AVX512-VNNI).
    pub fn has_packed_int8_products(&self) -> bool {
        match self {
            CompactParams::Q8 { tensors, .. } => {
                tensors.iter().flatten().all(Q8Tensor::has_packed_products)
            }
            CompactParams::Bf16(_) => false,
        }
    }

    /// Bytes of one matrix element in this copy (int8: the value and its share of the scale).
    pub fn bytes_per_weight(&self) -> f64 {
        match self {
            CompactParams::Bf16(_) => 2.0,
            CompactParams::Q8 { group, .. } => 1.0 + 4.0 / *group as f64,
        }
    }
}

/// Views of one parameter buffer.
#[derive(Debug, Clone, Copy)]
pub struct Weights<'a> {
    layout: &'a ParamLayout,
    f32: &'a [f32],
    /// Where `f32` starts in the layout (a window holding some tensors only; 0 for the whole).
    offset: usize,
    compact: Option<&'a CompactParams>,
}

/// The weights of one transformer layer.
#[derive(Debug, Clone, Copy)]
pub struct LayerWeights<'a> {
    pub attn_norm: &'a [f32],
    pub attn: AttentionWeights<'a>,
    pub ffn_norm: &'a [f32],
    pub ffn: FfnWeights<'a>,
}

impl<'a> Weights<'a> {
    /// The f32 parameters (`params.len()` must equal `layout.total()`, checked by callers).
    pub fn new(layout: &'a ParamLayout, f32: &'a [f32]) -> Self {
        Weights {
            layout,
            f32,
            offset: 0,
            compact: None,
        }
    }

    /// A window of the parameters: `f32` holds the layout's elements from `offset` on (one
    /// layer of a frozen model expanded from its compact copy). Only tensors inside it may be
    /// read.
    pub fn window(layout: &'a ParamLayout, f32: &'a [f32], offset: usize) -> Self {
        Weights {
            layout,
            f32,
            offset,
            compact: None,
        }
    }

    fn range(&self, id: TensorId) -> std::ops::Range<usize> {
        let r = self.layout.range(id);
        r.start - self.offset..r.end - self.offset
    }

    /// With a compact copy of the matrices (made from this layout), read by the kernels that
    /// honour it.
    pub fn with_compact(self, compact: Option<&'a CompactParams>) -> Self {
        Weights { compact, ..self }
    }

    /// A vector (or any tensor) as a flat slice.
    pub fn vector(&self, id: TensorId) -> &'a [f32] {
        &self.f32[self.range(id)]
    }

    /// A matrix `[out, in]`.
    pub fn matrix(&self, id: TensorId) -> Matrix<'a> {
        let t = &self.layout.tensors[id];
        let r = t.range();
        Matrix {
            f32: &self.f32[self.range(id)],
            compact: match self.compact {
                None => None,
                Some(CompactParams::Bf16(b)) => Some(CompactWeights::Bf16(&b[r])),
                Some(CompactParams::Q8 { tensors, .. }) => {
                    tensors[id].as_ref().map(|t| CompactWeights::Q8(t.view()))
                }
            },
            rows: t.shape[0],
            cols: t.shape[1],
        }
    }

    /// The weights of layer `l`.
    pub fn layer(&self, l: usize) -> LayerWeights<'a> {
        let lt = &self.layout.layers[l];
        LayerWeights {
            attn_norm: self.vector(lt.attn_norm),
            attn: AttentionWeights {
                wq: self.matrix(lt.wq),
                wk: self.matrix(lt.wk),
                wv: self.matrix(lt.wv),
                wo: self.matrix(lt.wo),
                q_norm: lt.q_norm.map(|id| self.vector(id)),
                k_norm: lt.k_norm.map(|id| self.vector(id)),
            },
            ffn_norm: self.vector(lt.ffn_norm),
            ffn: FfnWeights {
                gate: self.matrix(lt.w_gate),
                up: self.matrix(lt.w_up),
                down: self.matrix(lt.w_down),
            },
        }
    }
}
