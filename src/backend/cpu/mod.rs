//! CPU kernels: each operation is a forward/backward pair over flat slices, with the shapes
//! documented on the function. Nothing here knows the [`Kernels`](super::Kernels) trait:
//! `backend/kernels.rs` calls these functions for its defaults, and `backend/cpu_kernels.rs`
//! implements the trait for the CPU (`backend::CpuKernels`, `backend::CpuBf16Kernels`).
//!
//! Files import each other in one direction: `send_ptr`, `matrix`, `math`, `team`, `pack`
//! and the path choices (`bf16_path`, `f32_path`) at the bottom; the GEMMs (`gemm_crate`,
//! `gemm_f32`, `gemm_amx`, then `gemm_bf16`, which hands depth to AMX) and `accelerate`
//! above them; the operations (`linear`, `gemv`, `attention`, `quant`, norms, ...) on top.
//! `quant` (int8 rows and their one-row products) and `gemm_q8` (the int8 products of several
//! rows over weights packed for `vpdpbusd`) call each other: `quant` hands several rows to
//! `gemm_q8`, which reads `quant`'s quantised rows.
//! This file only declares the modules, re-exports, and describes the kernels in words.

pub mod accelerate;
pub mod attention;
pub mod bf16_path;
pub mod embedding;
pub mod f32_path;
pub mod gemm_amx;
pub mod gemm_bf16;
pub mod gemm_crate;
pub mod gemm_f32;
pub mod gemm_q8;
pub mod gemv;
pub mod linear;
pub mod loss;
pub mod math;
pub mod matrix;
pub mod pack;
pub mod quant;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
pub mod send_ptr;
pub mod swiglu;
pub mod team;

pub use self::bf16_path::{Bf16Path, bf16_path};
pub use self::f32_path::{F32Path, f32_path};

/// Whether this CPU runs bf16 products in hardware (AVX512_BF16); elsewhere they are emulated
/// with the same numerics, more slowly than fp32.
pub fn bf16_in_hardware() -> bool {
    gemm_bf16::available()
}

/// A short description of the CPU kernels of a precision, for run headers and reports.
pub fn describe(bf16: bool) -> String {
    if !bf16 {
        return f32_path::describe();
    }
    if gemm_amx::available() {
        "packed bf16 GEMM on AMX tiles (bf16 products, f32 accumulation)".to_string()
    } else if bf16_in_hardware() {
        "packed AVX512_BF16 GEMM (bf16 products, f32 accumulation)".to_string()
    } else {
        "bf16 products emulated in portable code (same numerics, slower than fp32)".to_string()
    }
}
