//! Small utilities shared by several modules.

pub mod fsutil;
pub mod mem;
pub mod rng;
