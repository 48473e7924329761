//! CPU kernels: each operation is a forward/backward pair over flat slices, with the shapes
//! documented on the function.

pub mod attention;
pub mod embedding;
pub mod gemm_bf16;
pub mod gemm_f32;
pub mod gemv;
pub mod linear;
pub mod loss;
pub mod math;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

use super::Kernels;

/// A raw pointer to f32 data that parallel tasks may share, each writing a disjoint part (the
/// columns of one attention head, the rows of one GEMM block).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: every user writes disjoint elements from different tasks (documented at each use)
// and keeps the allocation alive across the parallel loop.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

/// The CPU backend (the reference kernels, multi-threaded with rayon).
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuKernels;

impl Kernels for CpuKernels {
    fn name(&self) -> &'static str {
        "cpu"
    }
}

/// The CPU backend with bf16 matrix multiplies (f32 accumulation) for the linear layers, on
/// CPUs with AVX512_BF16. Everything else, including attention, norms, the loss, master
/// weights and the optimizer, stays f32.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBf16Kernels;

impl Kernels for CpuBf16Kernels {
    fn name(&self) -> &'static str {
        "cpu-bf16"
    }

    fn linear_forward(
        &self,
        y: &mut [f32],
        x: &[f32],
        w: &[f32],
        rows: usize,
        d_in: usize,
        d_out: usize,
    ) {
        use gemm_bf16::{MatRef, gemm_bf16};
        let a = MatRef {
            data: x,
            rs: d_in,
            cs: 1,
        };
        let b = MatRef {
            data: w,
            rs: 1,
            cs: d_in,
        };
        gemm_bf16(rows, d_out, d_in, a, b, y, d_out, false);
    }

    fn linear_backward_input(
        &self,
        dx: &mut [f32],
        dy: &[f32],
        w: &[f32],
        rows: usize,
        d_in: usize,
        d_out: usize,
        accumulate: bool,
    ) {
        use gemm_bf16::{MatRef, gemm_bf16};
        let a = MatRef {
            data: dy,
            rs: d_out,
            cs: 1,
        };
        let b = MatRef {
            data: w,
            rs: d_in,
            cs: 1,
        };
        gemm_bf16(rows, d_in, d_out, a, b, dx, d_in, accumulate);
    }

    fn attention_forward(
        &self,
        out: &mut [f32],
        probs: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: &super::AttentionShape,
    ) {
        attention::attention_forward_bf16(out, probs, q, k, v, shape)
    }

    fn attention_backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        probs: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: &super::AttentionShape,
    ) {
        attention::attention_backward_bf16(dq, dk, dv, dout, probs, q, k, v, shape)
    }

    fn linear_backward_weight(
        &self,
        dw: &mut [f32],
        dy: &[f32],
        x: &[f32],
        rows: usize,
        d_in: usize,
        d_out: usize,
    ) {
        use gemm_bf16::{MatRef, gemm_bf16};
        let a = MatRef {
            data: dy,
            rs: 1,
            cs: d_out,
        };
        let b = MatRef {
            data: x,
            rs: d_in,
            cs: 1,
        };
        gemm_bf16(d_out, d_in, rows, a, b, dw, d_in, true);
    }
}
