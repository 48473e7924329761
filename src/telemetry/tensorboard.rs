//! A TensorBoard sink with no Python at run time: event files as TensorBoard writes them
//! (`events.out.tfevents.TIME.HOST.PID.handgrad`), each record framed as TFRecord (length,
//! masked CRC-32C of the length, the bytes, masked CRC-32C of the bytes) and holding an
//! `Event` protocol buffer: the file version first, then `Summary` values (scalars as
//! `simple_value`, text through the text plugin as a string tensor).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::events::{Event, Record};
use super::sinks::EventSink;
use crate::error::{Error, Result};

/// TFRecord's CRC mask.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Protocol-buffer encoding of the few messages needed.
mod pb {
    pub fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn key(out: &mut Vec<u8>, field: u32, wire: u32) {
        varint(out, ((field << 3) | wire) as u64);
    }
    pub fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
        key(out, field, 2);
        varint(out, b.len() as u64);
        out.extend_from_slice(b);
    }
    pub fn double(out: &mut Vec<u8>, field: u32, v: f64) {
        key(out, field, 1);
        out.extend_from_slice(&v.to_le_bytes());
    }
    pub fn float(out: &mut Vec<u8>, field: u32, v: f32) {
        key(out, field, 5);
        out.extend_from_slice(&v.to_le_bytes());
    }
    pub fn int(out: &mut Vec<u8>, field: u32, v: u64) {
        key(out, field, 0);
        varint(out, v);
    }
}

/// `Event { wall_time = 1, step = 2, file_version = 3 | summary = 5 }`.
fn event(wall_time: f64, step: u64, body: EventBody) -> Vec<u8> {
    let mut e = Vec::new();
    pb::double(&mut e, 1, wall_time);
    pb::int(&mut e, 2, step);
    match body {
        EventBody::FileVersion(v) => pb::bytes(&mut e, 3, v.as_bytes()),
        EventBody::Summary(values) => {
            let mut s = Vec::new();
            for v in values {
                pb::bytes(&mut s, 1, &v);
            }
            pb::bytes(&mut e, 5, &s);
        }
    }
    e
}

enum EventBody {
    FileVersion(&'static str),
    /// Encoded `Summary.Value`s.
    Summary(Vec<Vec<u8>>),
}

/// `Summary.Value { tag = 1, simple_value = 2 }`.
fn scalar_value(tag: &str, v: f64) -> Vec<u8> {
    let mut out = Vec::new();
    pb::bytes(&mut out, 1, tag.as_bytes());
    pb::float(&mut out, 2, v as f32);
    out
}

/// `Summary.Value { tag = 1, metadata = 9 { plugin_data = 1 { plugin_name = 1: "text" } },
/// tensor = 8 { dtype = 1: DT_STRING (7), tensor_shape = 2: {}, string_val = 8 } }`.
fn text_value(tag: &str, text: &str) -> Vec<u8> {
    let mut plugin = Vec::new();
    pb::bytes(&mut plugin, 1, b"text");
    let mut meta = Vec::new();
    pb::bytes(&mut meta, 1, &plugin);
    let mut tensor = Vec::new();
    pb::int(&mut tensor, 1, 7);
    pb::bytes(&mut tensor, 2, &[]);
    pb::bytes(&mut tensor, 8, text.as_bytes());
    let mut out = Vec::new();
    pb::bytes(&mut out, 1, tag.as_bytes());
    pb::bytes(&mut out, 9, &meta);
    pb::bytes(&mut out, 8, &tensor);
    out
}

/// Writes TensorBoard event files (the file is created with the run's first event, so a run
/// that fails before it starts leaves nothing behind).
pub struct TensorBoardSink {
    dir: PathBuf,
    file: Option<(PathBuf, BufWriter<File>)>,
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

impl TensorBoardSink {
    /// A writer into `dir` (created with the first event).
    pub fn new(dir: &Path) -> Self {
        TensorBoardSink {
            dir: dir.to_path_buf(),
            file: None,
        }
    }

    /// A writer for the run in `run_dir` under a TensorBoard log folder: its files go into
    /// `logdir/NAME` (NAME: the run folder's name), so each run shows as its own run in
    /// TensorBoard, as Hugging Face and Lightning lay them out; a resumed run adds its file
    /// beside its first.
    pub fn for_run(logdir: &Path, run_dir: &Path) -> Self {
        let name = run_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty() && n != "." && n != "..")
            .unwrap_or_else(|| "run".into());
        Self::new(&logdir.join(name))
    }

    /// The event file, once created.
    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|(p, _)| p.as_path())
    }

    fn open(&mut self) -> Result<()> {
        crate::util::fsutil::create_dir_all(&self.dir)?;
        let now = super::events::unix_now();
        let name = format!(
            "events.out.tfevents.{}.{}.{}.handgrad",
            now as u64,
            hostname(),
            std::process::id()
        );
        let path = self.dir.join(name);
        let f = File::create(&path).map_err(|e| Error::io("creating", &path, e))?;
        self.file = Some((path, BufWriter::new(f)));
        self.write(&event(now, 0, EventBody::FileVersion("brain.Event:2")))
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        if self.file.is_none() {
            self.open()?;
        }
        let Some((path, out)) = &mut self.file else {
            return Ok(());
        };
        let len = (data.len() as u64).to_le_bytes();
        let mut framed = Vec::with_capacity(data.len() + 16);
        framed.extend_from_slice(&len);
        framed.extend_from_slice(&masked_crc(&len).to_le_bytes());
        framed.extend_from_slice(data);
        framed.extend_from_slice(&masked_crc(data).to_le_bytes());
        out.write_all(&framed)
            .and_then(|_| out.flush())
            .map_err(|e| Error::io("writing", path.as_path(), e))
    }

    fn summary(&mut self, time: f64, step: u64, values: Vec<Vec<u8>>) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        self.write(&event(time, step, EventBody::Summary(values)))
    }
}

impl EventSink for TensorBoardSink {
    fn name(&self) -> String {
        format!("TensorBoard writer {}", self.dir.display())
    }

    fn emit(&mut self, r: &Record) -> Result<()> {
        let t = r.time;
        match &r.event {
            Event::RunStart { train, model, .. } => {
                let cfg = serde_json::json!({"train": train, "model": model});
                let text = format!(
                    "```\n{}\n```",
                    serde_json::to_string_pretty(&cfg).unwrap_or_default()
                );
                self.summary(t, 0, vec![text_value("config", &text)])
            }
            Event::Step {
                step,
                loss,
                lr,
                grad_norm,
                ms,
                tokens_per_s,
                kernels,
                loss_scale,
                power_w,
                ..
            } => {
                let mut v = vec![
                    scalar_value("train/loss", *loss),
                    scalar_value("train/lr", *lr),
                    scalar_value("train/grad_norm", *grad_norm),
                    scalar_value("train/ms_per_update", *ms),
                    scalar_value("train/tokens_per_s", *tokens_per_s),
                ];
                if let Some(s) = loss_scale {
                    v.push(scalar_value("train/loss_scale", *s));
                }
                if let Some(p) = power_w {
                    v.push(scalar_value("system/power_w", *p));
                }
                for k in kernels {
                    v.push(scalar_value(&format!("kernels_ms/{}", k.kernel), k.ms));
                }
                self.summary(t, *step, v)
            }
            Event::Eval {
                step,
                val_loss,
                best_val_loss,
                ..
            } => self.summary(
                t,
                *step,
                vec![
                    scalar_value("eval/val_loss", *val_loss),
                    scalar_value("eval/best_val_loss", *best_val_loss),
                ],
            ),
            Event::Sample { step, text, .. } => {
                self.summary(t, *step, vec![text_value("sample", text)])
            }
            Event::RunEnd {
                step,
                tokens_per_s,
                gflops_per_s,
                ..
            } => self.summary(
                t,
                *step,
                vec![
                    scalar_value("run/tokens_per_s", *tokens_per_s),
                    scalar_value("run/gflops_per_s", *gflops_per_s),
                ],
            ),
            Event::RunError { step, message } => {
                self.summary(t, *step, vec![text_value("error", message)])
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn masked_crc_of_known_data() {
        // CRC-32C("123456789") = 0xE3069283 (the standard check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let c: u32 = 0xE306_9283;
        assert_eq!(
            super::masked_crc(b"123456789"),
            c.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }
}
