//! Compute backends behind one [`Kernels`] interface.
//!
//! The model's forward and backward (see `model::transformer`) call only the methods of
//! [`Kernels`]. Each method has a default implementation: the CPU reference kernel of
//! [`cpu`]. A backend overrides the operations it accelerates; ARCHITECTURE.md maps these
//! operations onto the ten accelerator kernels of the original ANE design.

pub mod cpu;

pub use cpu::attention::AttentionShape;

use crate::error::{Error, Result};

/// The CPU kernels of a matmul precision: `fp32`, or `bf16` (bf16 products with f32
/// accumulation: `vdpbf16ps` on CPUs with AVX512_BF16, a portable emulation with the same
/// numerics elsewhere, see [`bf16_emulated`]).
pub fn kernels_for(precision: &str) -> Result<Box<dyn Kernels>> {
    match precision {
        "fp32" => Ok(Box::new(cpu::CpuKernels)),
        "bf16" => Ok(Box::new(cpu::CpuBf16Kernels)),
        other => Err(Error::invalid(format!(
            "unknown --precision '{other}' (fp32 or bf16)"
        ))),
    }
}

/// The operations a training step is made of. All tensors are row-major f32 slices; the shapes
/// are documented on the CPU functions each default method calls.
#[allow(clippy::too_many_arguments)]
pub trait Kernels: Send + Sync {
    /// A short name for reports.
    fn name(&self) -> &'static str;

    /// `y [rows, d_out] = x [rows, d_in] W^T`, `W [d_out, d_in]`.
    fn linear_forward(
        &self,
        y: &mut [f32],
        x: &[f32],
        w: &[f32],
        rows: usize,
        d_in: usize,
        d_out: usize,
    ) {
        cpu::linear::linear_forward(y, x, w, rows, d_in, d_out)
    }

    /// `dx [rows, d_in] (+)= dy [rows, d_out] W`.
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
        cpu::linear::linear_backward_input(dx, dy, w, rows, d_in, d_out, accumulate)
    }

    /// `dW [d_out, d_in] += dy^T x`.
    fn linear_backward_weight(
        &self,
        dw: &mut [f32],
        dy: &[f32],
        x: &[f32],
        rows: usize,
        d_in: usize,
        d_out: usize,
    ) {
        cpu::linear::linear_backward_weight(dw, dy, x, rows, d_in, d_out)
    }

    /// Causal GQA attention; saves the probabilities.
    fn attention_forward(
        &self,
        out: &mut [f32],
        probs: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: &AttentionShape,
    ) {
        cpu::attention::attention_forward(out, probs, q, k, v, shape)
    }

    /// Gradients of causal GQA attention with respect to q, k and v.
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
        shape: &AttentionShape,
    ) {
        cpu::attention::attention_backward(dq, dk, dv, dout, probs, q, k, v, shape)
    }

    /// Residual add: `out = a + b`.
    fn add(&self, out: &mut [f32], a: &[f32], b: &[f32]) {
        cpu::residual::residual_add(out, a, b)
    }

    /// `g = silu(h1) * h3`.
    fn swiglu_forward(&self, g: &mut [f32], h1: &[f32], h3: &[f32]) {
        cpu::swiglu::swiglu_forward(g, h1, h3)
    }

    /// Gradients of the SwiGLU gate.
    fn swiglu_backward(
        &self,
        dh1: &mut [f32],
        dh3: &mut [f32],
        dg: &[f32],
        h1: &[f32],
        h3: &[f32],
    ) {
        cpu::swiglu::swiglu_backward(dh1, dh3, dg, h1, h3)
    }

    /// Row-wise RMSNorm; saves `1/rms` per row.
    fn rmsnorm_forward(
        &self,
        out: &mut [f32],
        rstd: &mut [f32],
        x: &[f32],
        w: &[f32],
        d: usize,
        eps: f32,
    ) {
        cpu::rmsnorm::rmsnorm_forward(out, rstd, x, w, d, eps)
    }

    /// Gradients of RMSNorm (input overwritten or accumulated, gain accumulated).
    fn rmsnorm_backward(
        &self,
        dx: &mut [f32],
        dw: &mut [f32],
        dy: &[f32],
        x: &[f32],
        w: &[f32],
        rstd: &[f32],
        d: usize,
        accumulate: bool,
    ) {
        cpu::rmsnorm::rmsnorm_backward(dx, dw, dy, x, w, rstd, d, accumulate)
    }

    /// Sum of the cross-entropy losses of the rows.
    fn cross_entropy_loss(&self, logits: &[f32], targets: &[u32], vocab: usize) -> f64 {
        cpu::loss::cross_entropy_loss(logits, targets, vocab)
    }

    /// Loss sum, and `logits` replaced by `scale * dloss/dlogits`.
    fn cross_entropy_forward_backward(
        &self,
        logits: &mut [f32],
        targets: &[u32],
        vocab: usize,
        scale: f32,
    ) -> f64 {
        cpu::loss::cross_entropy_forward_backward(logits, targets, vocab, scale)
    }
}

/// Whether bf16 matrix multiplies run in portable emulation here (no AVX512_BF16): the same
/// results as the hardware path, but slower than fp32.
pub fn bf16_emulated() -> bool {
    !cpu::gemm_bf16::available()
}
