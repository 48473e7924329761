//! Training: the configuration, the loop, checkpoints and resume.

pub mod config;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::{RunOptions, RunPaths, TrainOutcome, default_threads, load_latest, train};
