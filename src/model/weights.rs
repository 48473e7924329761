//! The parameters of a model as the kernels receive them: typed views of one flat buffer
//! (and, when decoding with `--weights bf16`, of its bf16 copy with the same layout).

use super::params::{ParamLayout, TensorId};
use crate::backend::{AttentionWeights, FfnWeights, Matrix};

/// Views of one parameter buffer.
#[derive(Debug, Clone, Copy)]
pub struct Weights<'a> {
    layout: &'a ParamLayout,
    f32: &'a [f32],
    bf16: Option<&'a [u16]>,
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
            bf16: None,
        }
    }

    /// With a bf16 copy of the same layout, read by matrix-vector products.
    pub fn with_bf16(self, bf16: Option<&'a [u16]>) -> Self {
        Weights { bf16, ..self }
    }

    /// A vector (or any tensor) as a flat slice.
    pub fn vector(&self, id: TensorId) -> &'a [f32] {
        &self.f32[self.layout.range(id)]
    }

    /// A matrix `[out, in]`.
    pub fn matrix(&self, id: TensorId) -> Matrix<'a> {
        let t = &self.layout.tensors[id];
        let r = t.range();
        Matrix {
            f32: &self.f32[r.clone()],
            bf16: self.bf16.map(|b| &b[r]),
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
