//! Telemetry: typed events, the bus that stamps and fans them out, and the sinks that render
//! or record them.

pub mod bus;
pub mod console;
pub mod events;
pub mod sinks;

pub use bus::EventBus;
pub use console::{ConsoleMode, ConsoleSink};
pub use events::{CheckpointKind, EndReason, Event, LossKind, Record};
pub use sinks::{EventSink, JsonlSink, MemorySink};
