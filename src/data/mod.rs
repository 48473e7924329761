//! Training data: token shards (mmap), the window sampler and validation split, and the
//! built-in corpus.

pub mod builtin;
pub mod chat;
pub mod dataset;
pub mod documents;
pub mod fetch;
pub mod prepare;
pub mod shards;
pub mod stories;

pub use dataset::{Dataset, SamplerState, WindowSampler};
pub use shards::{TokenShard, write_shard};
