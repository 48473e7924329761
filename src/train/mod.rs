//! Training: the configuration, the resolution of a run, the training step, the loop,
//! checkpoints and resume.

pub mod batches;
pub mod compile_budget;
pub mod diloco;
pub mod distributed;
pub mod grad_sync;
pub mod loss_scale;
pub mod memory;
pub mod options;
pub mod resolve;
pub mod resume;
pub mod run_folder;
pub mod step;
pub mod trainer;

pub use crate::run::{LossScale, RunDir, RunLock, TrainConfig};
pub use options::{CommOptions, RunOptions, default_threads};
pub use resume::GivenFlags;
pub use run_folder::load_latest;
pub use step::{FrozenBase, StepComm, StepState, StepStats, TrainStep};
pub use trainer::{TrainOutcome, train};
