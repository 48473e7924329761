//! Telemetry: typed events and the sinks that render or record them.

pub mod events;
pub mod sinks;

pub use events::{Event, Record};
pub use sinks::{ConsoleMode, ConsoleSink, EventSink, JsonlSink, MemorySink};
