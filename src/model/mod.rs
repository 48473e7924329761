//! The transformer: configuration, parameters, activations, and the whole-model forward and
//! backward passes.

pub mod activations;
pub mod config;
pub mod frozen;
pub mod lora;
pub mod lora_pass;
pub mod params;
pub mod rope_layout;
pub mod timing;
pub mod transformer;
pub mod weights;

pub use activations::{Activations, LayerActivations};
pub use config::{Architecture, ModelConfig, RopeStyle};
pub use frozen::{BaseFormat, FrozenModel};
pub use lora::{LoraConfig, LoraLayout, LoraTarget};
pub use lora_pass::{Adapters, LoraActs};
pub use params::{ParamLayout, TensorId, TensorSpec};
pub use transformer::{Base, Batch, LayerIo, Transformer, VocabCompaction};
pub use weights::{CompactParams, LayerWeights, Weights};
