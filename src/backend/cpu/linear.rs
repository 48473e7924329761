//! Linear layers (no bias) as matrix multiplies. Weights are stored `[out, in]` as in
//! PyTorch / Hugging Face, so `y = x W^T`.
//!
//! The products run on the kernel of [`super::f32_path`]: Accelerate's `cblas_sgemm` on macOS;
//! handgrad's packed AVX-512 GEMM (`gemm_f32`) for large products where the CPU has AVX-512F,
//! small ones (tests, tiny models) on the `gemm` crate, whose single-threaded path has less
//! overhead than packing; the `gemm` crate on other CPUs.

use super::f32_path::{self, F32Path};
use super::gemm_crate::gemm_crate;
use super::matrix::{MatMut, MatRef};
use crate::backend::types::LinearShape;

/// Products of at least this many multiply-adds use the packed GEMM when available.
const PACKED_THRESHOLD: usize = 1 << 20;

/// `C (+)= A · B` on this process's [`F32Path`]: a CBLAS (Accelerate on macOS), the packed
/// GEMM for large products where the CPU has AVX-512F, else the crate.
fn matmul(a: MatRef, b: MatRef, c: MatMut, accumulate: bool) {
    let mut c = c;
    if let Some(blas) = f32_path::cblas()
        && blas.gemm(a, b, &mut c, accumulate)
    {
        return;
    }
    if f32_path::f32_path() == F32Path::Avx512 && a.rows * b.cols * a.cols >= PACKED_THRESHOLD {
        super::gemm_f32::gemm_f32(a, b, c, accumulate);
    } else {
        gemm_crate(a, b, c, accumulate, true);
    }
}

/// Forward. Shapes: `x [rows, d_in]`, `w [d_out, d_in]` -> `y [rows, d_out]` (overwritten).
pub fn linear_forward(y: &mut [f32], x: &[f32], w: &[f32], s: LinearShape) {
    matmul(
        MatRef::row_major(x, s.rows, s.d_in),
        MatRef::transposed(w, s.d_in, s.d_out),
        MatMut::row_major(y, s.rows, s.d_out),
        false,
    );
}

/// Backward to the input. Shapes: `dy [rows, d_out]`, `w [d_out, d_in]` -> `dx [rows, d_in]`,
/// `dx = dy W` (added to `dx` when `accumulate`).
pub fn linear_backward_input(
    dx: &mut [f32],
    dy: &[f32],
    w: &[f32],
    s: LinearShape,
    accumulate: bool,
) {
    matmul(
        MatRef::row_major(dy, s.rows, s.d_out),
        MatRef::row_major(w, s.d_out, s.d_in),
        MatMut::row_major(dx, s.rows, s.d_in),
        accumulate,
    );
}

/// Backward to the weight, accumulating. Shapes: `dy [rows, d_out]`, `x [rows, d_in]` ->
/// `dw [d_out, d_in] += dy^T x`.
pub fn linear_backward_weight(dw: &mut [f32], dy: &[f32], x: &[f32], s: LinearShape) {
    matmul(
        MatRef::transposed(dy, s.d_out, s.rows),
        MatRef::row_major(x, s.rows, s.d_in),
        MatMut::row_major(dw, s.d_out, s.d_in),
        true,
    );
}
