//! CPU kernels: each operation is a forward/backward pair over flat slices, with the shapes
//! documented on the function.

pub mod attention;
pub mod embedding;
pub mod linear;
pub mod loss;
pub mod math;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

use super::Kernels;

/// The CPU backend (the reference kernels, multi-threaded with rayon).
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuKernels;

impl Kernels for CpuKernels {
    fn name(&self) -> &'static str {
        "cpu"
    }
}
