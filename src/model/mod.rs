//! The transformer: configuration, parameters, activations, and the whole-model forward and
//! backward passes.

pub mod activations;
pub mod config;
pub mod params;
pub mod rope_layout;
pub mod timing;
pub mod transformer;
pub mod weights;

pub use activations::{Activations, LayerActivations};
pub use config::{Architecture, ModelConfig, RopeStyle};
pub use params::{ParamLayout, TensorId, TensorSpec};
pub use transformer::{Batch, LayerIo, Transformer, VocabCompaction};
pub use weights::{CompactParams, LayerWeights, Weights};
