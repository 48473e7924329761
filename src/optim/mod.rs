//! Optimizers and learning-rate schedules.

pub mod adamw;
pub mod schedule;

pub use adamw::{AdamW, AdamWConfig, global_norm};
pub use schedule::CosineSchedule;
