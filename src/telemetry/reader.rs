//! Reading `events.jsonl` robustly: a run may still be writing its last line, and a file may
//! hold damaged lines or events of a newer version. Such lines are skipped and counted, never
//! a crash.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::events::Record;
use crate::error::{Error, Result};

/// The records of a file and how many lines could not be read.
#[derive(Debug, Clone, Default)]
pub struct RunLog {
    pub records: Vec<Record>,
    pub skipped: usize,
}

/// Parses one line: `None` for a blank line, `Some(Err)` for one that is not a record.
fn parse_line(line: &str) -> Option<std::result::Result<Record, ()>> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    Some(serde_json::from_str(line).map_err(|_| ()))
}

/// Reads a whole file (a finished run, or a snapshot of a running one: an unfinished last
/// line is skipped and counted).
pub fn read_file(path: &Path) -> Result<RunLog> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    let text = String::from_utf8_lossy(&bytes);
    let mut log = RunLog::default();
    for line in text.split('\n') {
        match parse_line(line) {
            None => {}
            Some(Ok(r)) => log.records.push(r),
            Some(Err(())) => log.skipped += 1,
        }
    }
    Ok(log)
}

/// Follows a file as it grows: each [`Follower::poll`] returns the complete lines appended
/// since the last one; an incomplete last line waits for its end.
#[derive(Debug)]
pub struct Follower {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    /// Lines that could not be read so far.
    pub skipped: usize,
}

impl Follower {
    /// Follows `path` from its start (the file need not exist yet).
    pub fn new(path: &Path) -> Self {
        Follower {
            path: path.to_path_buf(),
            offset: 0,
            partial: Vec::new(),
            skipped: 0,
        }
    }

    /// Whether the file exists yet.
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// The records of the lines completed since the last call.
    pub fn poll(&mut self) -> Result<Vec<Record>> {
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("opening", &self.path, e)),
        };
        let len = f
            .metadata()
            .map_err(|e| Error::io("reading", &self.path, e))?
            .len();
        if len < self.offset {
            // The file was replaced or truncated: start over.
            self.offset = 0;
            self.partial.clear();
        }
        f.seek(SeekFrom::Start(self.offset))
            .map_err(|e| Error::io("reading", &self.path, e))?;
        let mut buf = Vec::new();
        f.take(len - self.offset)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io("reading", &self.path, e))?;
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let mut out = Vec::new();
        while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=nl).collect();
            match parse_line(&String::from_utf8_lossy(&line)) {
                None => {}
                Some(Ok(r)) => out.push(r),
                Some(Err(())) => self.skipped += 1,
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Event;

    fn line(msg: &str) -> String {
        serde_json::to_string(&Record::now(Event::Info {
            message: msg.into(),
        }))
        .unwrap()
    }

    #[test]
    fn garbage_and_truncated_lines_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let text = format!(
            "{}\nnot json\n{{\"schema\":1,\"time\":1,\"event\":\"from_the_future\"}}\n\n{}\n{}",
            line("a"),
            line("b"),
            &line("c")[..20]
        );
        std::fs::write(&p, &text).unwrap();
        let log = read_file(&p).unwrap();
        assert_eq!((log.records.len(), log.skipped), (2, 3));

        // Following: the cut line waits, then completes.
        let mut f = Follower::new(&p);
        assert_eq!(f.poll().unwrap().len(), 2);
        assert_eq!(f.skipped, 2);
        let rest = &line("c")[20..];
        let mut all = text.clone();
        all.push_str(rest);
        all.push('\n');
        std::fs::write(&p, &all).unwrap();
        let more = f.poll().unwrap();
        assert_eq!(more.len(), 1, "{more:?}");
        assert_eq!(f.skipped, 2);
        // A missing file is no records yet.
        assert!(
            Follower::new(&dir.path().join("none"))
                .poll()
                .unwrap()
                .is_empty()
        );
    }
}
