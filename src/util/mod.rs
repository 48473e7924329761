//! Small utilities shared by several modules.

pub mod rng;
