//! File formats: safetensors (Hugging Face names), handgrad checkpoints.

pub mod safetensors;
