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
    /// Opens (appending to) a JSONL file. A last line cut short (the process was killed while
    /// writing it) is ended first, so the next record starts on a line of its own.
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io("opening event log", path, e))?;
        if ends_mid_line(&mut f).map_err(|e| Error::io("reading event log", path, e))? {
            f.write_all(b"\n")
                .map_err(|e| Error::io("writing", path, e))?;
        }
        Ok(JsonlSink {
            path: path.to_path_buf(),
            out: BufWriter::new(f),
        })
    }
}

/// Whether a file is non-empty and its last byte is not a newline.
fn ends_mid_line(f: &mut std::fs::File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(false);
    }
    f.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

impl EventSink for JsonlSink {
    fn name(&self) -> String {
        format!("event log {}", self.path.display())
    }

    fn emit(&mut self, record: &Record) -> Result<()> {
        let line =
            serde_json::to_string(record).map_err(|e| Error::json("encoding an event", e))?;
        crate::util::fsutil::fault::check_write(&self.path)
            .and_then(|_| writeln!(self.out, "{line}"))
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
