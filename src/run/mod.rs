//! What a run is, as plain typed values that every layer above can share: its settings
//! ([`TrainConfig`], saved in the folder, in checkpoints and in `run_start`), what it trains
//! and on what ([`ModelSpec`], [`DataSource`]), and its folder ([`RunDir`], the one place that
//! spells the folder's layout, and [`RunLock`], one trainer per folder).
//!
//! It sits below `formats` and `telemetry` (checkpoints and events carry a `TrainConfig`)
//! and above `model` and `backend`; resolving a run into a model, data and kernels is the
//! trainer's (`train::resolve`).

pub mod config;
pub mod dir;
pub mod lock;
pub mod spec;

pub use config::{LossScale, TrainConfig};
pub use dir::RunDir;
pub use lock::RunLock;
pub use spec::{BUILTIN_DATA, DataSource, ModelSpec};
