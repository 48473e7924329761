//! Telemetry: typed events, the bus that stamps and fans them out, and the sinks that render
//! or record them.

pub mod bus;
pub mod console;
pub mod events;
pub mod power;
pub mod reader;
pub mod sinks;
pub mod tensorboard;
pub mod wandb;

pub use bus::EventBus;
pub use console::{ConsoleMode, ConsoleSink, human_bytes};
pub use events::{AcceleratorStep, CheckpointKind, EndReason, Event, LossKind, Record};
pub use sinks::{EventSink, JsonlSink, MemorySink};
