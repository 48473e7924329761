//! The sink interface, the JSON-lines file sink and an in-memory sink.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::events::Record;
use crate::error::{Error, Result};

/// Something that consumes events: a renderer, a file, a remote logger. A sink that returns an
/// error is detached by the [`super::EventBus`] (with a warning); training goes on.
pub trait EventSink: Send {
    /// A short name for messages ("event log runs/x/events.jsonl", "console").
    fn name(&self) -> String;
    /// Handles one event.
    fn emit(&mut self, record: &Record) -> Result<()>;
    /// Called once when the run ends.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Appends events to a JSON-lines file, one flushed line per event.
pub struct JsonlSink {
    path: PathBuf,
    out: BufWriter<File>,
}

impl JsonlSink {
    /// Opens (appending to) a JSONL file.
    pub fn open(path: &Path) -> Result<Self> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io("opening event log", path, e))?;
        Ok(JsonlSink {
            path: path.to_path_buf(),
            out: BufWriter::new(f),
        })
    }
}

impl EventSink for JsonlSink {
    fn name(&self) -> String {
        format!("event log {}", self.path.display())
    }

    fn emit(&mut self, record: &Record) -> Result<()> {
        let line =
            serde_json::to_string(record).map_err(|e| Error::json("encoding an event", e))?;
        writeln!(self.out, "{line}")
            .and_then(|_| self.out.flush())
            .map_err(|e| Error::io("writing", &self.path, e))
    }
}

/// Keeps every record in memory (tests, and callers that inspect a run).
#[derive(Debug, Default, Clone)]
pub struct MemorySink {
    pub records: std::sync::Arc<std::sync::Mutex<Vec<Record>>>,
}

impl MemorySink {
    /// The events received so far.
    pub fn events(&self) -> Vec<super::Event> {
        self.records
            .lock()
            .map(|v| v.iter().map(|r| r.event.clone()).collect())
            .unwrap_or_default()
    }
}

impl EventSink for MemorySink {
    fn name(&self) -> String {
        "memory".into()
    }

    fn emit(&mut self, record: &Record) -> Result<()> {
        if let Ok(mut v) = self.records.lock() {
            v.push(record.clone());
        }
        Ok(())
    }
}
