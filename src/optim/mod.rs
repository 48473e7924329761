//! Optimizers and learning-rate schedules.

pub mod adamw;
pub mod schedule;

pub use adamw::{AdamW, AdamWConfig, UpdateScale, global_norm, update_scale};
pub use schedule::CosineSchedule;
