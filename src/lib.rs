//! handgrad: train and run small transformer language models (Llama-2 and Qwen3 families) with
//! hand-written forward and backward passes.
//!
//! Layering (see ARCHITECTURE.md): `cli` -> `train` -> (`optim`, `data`, `model`) -> `backend`;
//! `generate`, `tokenizer`, `formats` and `telemetry` beside them.

pub mod backend;
pub mod bench;
pub mod cli;
pub mod dashboard;
pub mod data;
pub mod error;
pub mod eval;
pub mod formats;
pub mod fuzzing;
pub mod generate;
pub mod model;
pub mod optim;
pub mod plot;
pub mod run;
pub mod serve;
pub mod telemetry;
pub mod tokenizer;
pub mod train;
pub mod util;

pub use error::{Error, Result};
