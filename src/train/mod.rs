//! Training: the configuration, the resolution of a run, the training step, the loop,
//! checkpoints and resume.

pub mod config;
pub mod distributed;
pub mod loss_scale;
pub mod memory;
pub mod run_dir;
pub mod run_lock;
pub mod setup;
pub mod step;
pub mod trainer;

pub use config::TrainConfig;
pub use loss_scale::LossScale;
pub use run_dir::{RunPaths, load_latest};
pub use run_lock::RunLock;
pub use setup::GivenFlags;
pub use step::{StepState, StepStats, TrainStep};
pub use trainer::{RunOptions, TrainOutcome, default_threads, train};
