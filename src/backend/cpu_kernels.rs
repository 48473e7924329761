//! The CPU backend: [`CpuKernels`] (fp32) and [`CpuBf16Kernels`] (bf16 matrix multiplies)
//! implement [`Kernels`] on the slice kernels of [`super::cpu`], overriding the products
//! (int8 weights, matrix-vector products for one token row, bf16 GEMMs) and inheriting every
//! other operation's and block's default. Callers name them `backend::cpu::CpuKernels` (a
//! re-export); they live here, above `cpu/`, so that `cpu/` stays below the trait.

use super::cpu::attention;
use super::cpu::gemm_bf16;
use super::cpu::gemv::{FEW_ROWS, GemvOut, GemvRowsOut, GemvWeights, gemv_many, gemv_many_rows};
use super::cpu::linear;
use super::cpu::matrix::{MatMut, MatRef};
use super::cpu::quant;
use super::kernels::{Kernels, LinearOut, Tolerance};
use super::types::{
    AttentionShape, CompactWeights, LinearShape, Matrix, Qkv, QkvGrads, WeightFormat,
};
use crate::error::Result;

/// The weights a matrix-vector product reads: the bf16 copy when there is one.
fn gemv_weights<'a>(w: &Matrix<'a>) -> GemvWeights<'a> {
    match w.compact {
        Some(CompactWeights::Bf16(b)) => GemvWeights::Bf16(b),
        _ => GemvWeights::F32(w.f32),
    }
}

/// Products whose weights are all int8 ([`CompactWeights::Q8`], with one group size): the
/// input is quantised once and every product reads the int8 weights. Returns `false` (doing
/// nothing) when some output has other weights.
fn q8_outputs(x: &[f32], rows: usize, outs: &mut [LinearOut]) -> bool {
    let group = match outs.first().and_then(|o| o.w.compact) {
        Some(CompactWeights::Q8(q)) => q.group,
        _ => return false,
    };
    let cols = outs[0].w.cols;
    let all = outs.iter().all(|o| {
        o.w.cols == cols && matches!(o.w.compact, Some(CompactWeights::Q8(q)) if q.group == group)
    });
    if !all {
        return false;
    }
    thread_local! {
        /// The quantised input, its memory reused across products.
        static INPUT: std::cell::RefCell<quant::Q8Rows> = std::cell::RefCell::default();
    }
    INPUT.with_borrow_mut(|xq| {
        xq.quantize_from(x, rows, cols, group);
        for o in outs.iter_mut() {
            if let Some(CompactWeights::Q8(q)) = o.w.compact {
                quant::matmul_q8_prequantized(o.y, xq, rows, q, o.w.rows);
            }
        }
    });
    true
}

/// One token row: matrix-vector products, several matrices in one pass.
fn gemv_outputs(x: &[f32], outs: &mut [LinearOut]) {
    let Some(first) = outs.first() else {
        return;
    };
    let cols = first.w.cols;
    let mut gemvs: Vec<GemvOut> = outs
        .iter_mut()
        .map(|o| GemvOut {
            y: &mut o.y[..o.w.rows],
            w: gemv_weights(&o.w),
        })
        .collect();
    gemv_many(&mut gemvs, x, cols);
}

/// A few token rows (sequences decoded together): matrix-vector products that read each
/// weight once for all rows, several matrices in one pass. `false` (nothing done) when the
/// outputs do not share their input width.
fn few_rows_outputs(x: &[f32], rows: usize, outs: &mut [LinearOut]) -> bool {
    let Some(first) = outs.first() else {
        return true;
    };
    let cols = first.w.cols;
    if outs.iter().any(|o| o.w.cols != cols) {
        return false;
    }
    let mut gemvs: Vec<GemvRowsOut> = outs
        .iter_mut()
        .map(|o| GemvRowsOut {
            y: &mut o.y[..rows * o.w.rows],
            n: o.w.rows,
            w: gemv_weights(&o.w),
        })
        .collect();
    gemv_many_rows(&mut gemvs, x, rows, cols);
    true
}

/// The CPU backend in fp32 (the reference kernels, multi-threaded with rayon). Products of a
/// single token row (decoding) are matrix-vector products, which read a matrix's bf16 copy
/// when the caller keeps one (`generate --weights bf16`).
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuKernels;

impl Kernels for CpuKernels {
    fn reads_weights(&self, _format: WeightFormat) -> bool {
        true
    }

    fn products_on_cpu(&self) -> bool {
        true
    }

    fn linear_forward(&self, y: &mut [f32], x: &[f32], w: Matrix, rows: usize) -> Result<()> {
        if q8_outputs(x, rows, &mut [LinearOut { y: &mut *y, w }]) {
            return Ok(());
        }
        if rows == 1 {
            gemv_outputs(x, &mut [LinearOut { y, w }]);
        } else if rows > FEW_ROWS || !few_rows_outputs(x, rows, &mut [LinearOut { y: &mut *y, w }])
        {
            linear::linear_forward(y, x, w.f32, w.linear(rows));
        }
        Ok(())
    }

    fn linear_forward_multi(&self, x: &[f32], rows: usize, outs: &mut [LinearOut]) -> Result<()> {
        if q8_outputs(x, rows, outs) {
            return Ok(());
        }
        if rows == 1 && outs.iter().all(|o| o.w.cols == outs[0].w.cols) {
            gemv_outputs(x, outs);
            return Ok(());
        }
        if rows <= FEW_ROWS && few_rows_outputs(x, rows, outs) {
            return Ok(());
        }
        for o in outs.iter_mut() {
            self.linear_forward(o.y, x, o.w, rows)?;
        }
        Ok(())
    }
}

/// The CPU backend with bf16 matrix multiplies (f32 accumulation) for the linear layers and
/// the attention products, through `vdpbf16ps` on CPUs with AVX512_BF16 (emulated elsewhere).
/// Norms, softmax, the loss, master weights and the optimizer stay f32. A single token row
/// (decoding) is a matrix-vector product as in [`CpuKernels`]: with bf16 weights when the
/// caller keeps a bf16 copy, else f32; so are a few rows against a bf16 copy (sequences
/// decoded together).
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBf16Kernels;

impl Kernels for CpuBf16Kernels {
    fn reads_weights(&self, _format: WeightFormat) -> bool {
        true
    }

    fn products_on_cpu(&self) -> bool {
        true
    }

    fn tolerance(&self) -> Tolerance {
        Tolerance::BF16
    }

    fn linear_forward(&self, y: &mut [f32], x: &[f32], w: Matrix, rows: usize) -> Result<()> {
        if q8_outputs(x, rows, &mut [LinearOut { y: &mut *y, w }]) {
            return Ok(());
        }
        if rows == 1 {
            gemv_outputs(x, &mut [LinearOut { y, w }]);
            return Ok(());
        }
        // A few rows against a bf16 copy (sequences decoded together): read the copy once.
        if rows <= FEW_ROWS
            && w.compact.is_some()
            && few_rows_outputs(x, rows, &mut [LinearOut { y: &mut *y, w }])
        {
            return Ok(());
        }
        let s = w.linear(rows);
        gemm_bf16::gemm_bf16(
            MatRef::row_major(x, s.rows, s.d_in),
            MatRef::transposed(w.f32, s.d_in, s.d_out),
            MatMut::row_major(y, s.rows, s.d_out),
            false,
        );
        Ok(())
    }

    fn linear_forward_multi(&self, x: &[f32], rows: usize, outs: &mut [LinearOut]) -> Result<()> {
        if q8_outputs(x, rows, outs) {
            return Ok(());
        }
        if rows == 1 && outs.iter().all(|o| o.w.cols == outs[0].w.cols) {
            gemv_outputs(x, outs);
            return Ok(());
        }
        if rows <= FEW_ROWS
            && outs.iter().all(|o| o.w.compact.is_some())
            && few_rows_outputs(x, rows, outs)
        {
            return Ok(());
        }
        for o in outs.iter_mut() {
            self.linear_forward(o.y, x, o.w, rows)?;
        }
        Ok(())
    }

    fn linear_backward_input(
        &self,
        dx: &mut [f32],
        dy: &[f32],
        w: &[f32],
        s: LinearShape,
        accumulate: bool,
    ) -> Result<()> {
        gemm_bf16::gemm_bf16(
            MatRef::row_major(dy, s.rows, s.d_out),
            MatRef::row_major(w, s.d_out, s.d_in),
            MatMut::row_major(dx, s.rows, s.d_in),
            accumulate,
        );
        Ok(())
    }

    fn linear_backward_weight(
        &self,
        dw: &mut [f32],
        dy: &[f32],
        x: &[f32],
        s: LinearShape,
    ) -> Result<()> {
        gemm_bf16::gemm_bf16(
            MatRef::transposed(dy, s.d_out, s.rows),
            MatRef::row_major(x, s.rows, s.d_in),
            MatMut::row_major(dw, s.d_out, s.d_in),
            true,
        );
        Ok(())
    }

    fn attention_forward(
        &self,
        out: &mut [f32],
        saved: &mut [f32],
        x: Qkv,
        s: &AttentionShape,
    ) -> Result<()> {
        attention::attention_forward_bf16(out, saved, x, s);
        Ok(())
    }

    fn attention_backward(
        &self,
        g: QkvGrads,
        dout: &[f32],
        saved: &[f32],
        x: Qkv,
        s: &AttentionShape,
    ) -> Result<()> {
        attention::attention_backward_bf16(g, dout, saved, x, s);
        Ok(())
    }
}
