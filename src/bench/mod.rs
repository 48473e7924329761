//! Benchmarks of the machine and of handgrad: arithmetic peak, matmul throughput, full
//! training steps with a per-kernel breakdown, and generation speed.

pub mod generate;
pub mod matmul;
pub mod peak;
pub mod train;
