//! Benchmarks of the machine and of handgrad: arithmetic peak, matmul throughput, full
//! training steps with a per-kernel breakdown, and generation speed.

pub mod charts;
pub mod generate;
pub mod latency;
pub mod machine;
pub mod matmul;
pub mod memory;
pub mod peak;
pub mod report;
pub mod train;
