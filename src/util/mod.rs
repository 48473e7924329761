//! Small utilities shared by several modules.

pub mod alloc;
pub mod fsutil;
pub mod mem;
pub mod rng;
pub mod series;
