//! File formats: safetensors (Hugging Face names), handgrad checkpoints.

pub mod checkpoint;
pub mod safetensors;
