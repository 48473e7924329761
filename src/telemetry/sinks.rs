//! Event sinks: a JSON-lines file, and the console (a progress bar on a terminal, plain lines
//! otherwise).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, IsTerminal, Write};
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};

use super::events::{Event, Record, unix_now};
use crate::error::{Error, Result};

/// Something that consumes events.
pub trait EventSink {
    /// Handles one event.
    fn emit(&mut self, event: &Event) -> Result<()>;
    /// Called once when the run ends.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Appends events to a JSON-lines file, one flushed line per event.
pub struct JsonlSink {
    path: std::path::PathBuf,
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
    fn emit(&mut self, event: &Event) -> Result<()> {
        let rec = Record {
            time: unix_now(),
            event: event.clone(),
        };
        let line = serde_json::to_string(&rec).map_err(|e| Error::json("encoding an event", e))?;
        writeln!(self.out, "{line}")
            .and_then(|_| self.out.flush())
            .map_err(|e| Error::io("writing", &self.path, e))
    }
}

/// How the console shows progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleMode {
    /// A progress bar (terminals).
    Bar,
    /// One line every so often (logs, pipes).
    Lines,
    /// Nothing but warnings and the final sample.
    Quiet,
}

impl ConsoleMode {
    /// A bar on a terminal, lines otherwise.
    pub fn auto() -> Self {
        if std::io::stderr().is_terminal() {
            ConsoleMode::Bar
        } else {
            ConsoleMode::Lines
        }
    }
}

/// Renders events for people, on stderr (the sample text goes to stdout).
pub struct ConsoleSink {
    mode: ConsoleMode,
    bar: Option<ProgressBar>,
    last_line: std::time::Instant,
    loss_ema: Option<f64>,
}

impl ConsoleSink {
    /// A console renderer.
    pub fn new(mode: ConsoleMode) -> Self {
        ConsoleSink {
            mode,
            bar: None,
            last_line: std::time::Instant::now(),
            loss_ema: None,
        }
    }

    fn println(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None => eprintln!("{s}"),
        }
    }
}

fn human_bytes(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} KB", b / 1e3)
    }
}

impl EventSink for ConsoleSink {
    fn emit(&mut self, event: &Event) -> Result<()> {
        if self.mode == ConsoleMode::Quiet {
            if let Event::Warning { message } = event {
                eprintln!("warning: {message}");
            }
            return Ok(());
        }
        match event {
            Event::RunStart {
                run_dir,
                params,
                data,
                tokens_per_update,
                activation_bytes,
                threads,
                vocab_compacted_to,
                resumed_from_step,
                train,
                ..
            } => {
                let total = train.get("steps").and_then(|s| s.as_u64()).unwrap_or(0);
                let mut s = format!(
                    "run {run_dir}: {} parameters ({} non-embedding), {} tokens/update, {} threads, activations {}",
                    crate::model::config::human_count(params.total),
                    crate::model::config::human_count(params.non_embedding),
                    tokens_per_update,
                    threads,
                    human_bytes(*activation_bytes as f64),
                );
                s += &format!(
                    "\ndata {}: {} train / {} val tokens, split {}",
                    data.source, data.train_tokens, data.val_tokens, data.split
                );
                if let Some(v) = vocab_compacted_to {
                    s += &format!(
                        "\nvocabulary compaction: classifier over {v} ids (losses are compacted, not full-vocabulary)"
                    );
                }
                if let Some(st) = resumed_from_step {
                    s += &format!("\nresuming at update {st}");
                }
                eprintln!("{s}");
                if self.mode == ConsoleMode::Bar {
                    let bar = ProgressBar::new(total);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{spinner:.green} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} {msg} (eta {eta})",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    bar.set_position(resumed_from_step.unwrap_or(0));
                    self.bar = Some(bar);
                }
            }
            Event::Step {
                step,
                total_steps,
                loss,
                lr,
                grad_norm,
                ms,
                tokens_per_s,
                ..
            } => {
                let ema = match self.loss_ema {
                    Some(e) => 0.9 * e + 0.1 * loss,
                    None => *loss,
                };
                self.loss_ema = Some(ema);
                let msg = format!(
                    "loss {loss:.4} | lr {lr:.2e} | gnorm {grad_norm:.2} | {ms:.0} ms | {:.1}k tok/s",
                    tokens_per_s / 1e3
                );
                match &self.bar {
                    Some(b) => {
                        b.set_position(*step);
                        b.set_message(msg);
                    }
                    None => {
                        let due = self.last_line.elapsed().as_secs_f64() >= 5.0;
                        if due || *step == 1 || step == total_steps || step % 100 == 0 {
                            self.last_line = std::time::Instant::now();
                            eprintln!("step {step}/{total_steps} | {msg}");
                        }
                    }
                }
            }
            Event::Eval {
                step,
                val_loss,
                loss_kind,
                best_val_loss,
                ..
            } => {
                let kind = if loss_kind == "full" {
                    String::new()
                } else {
                    format!(" ({loss_kind})")
                };
                self.println(&format!(
                    "step {step}: val loss {val_loss:.4}{kind} (best {best_val_loss:.4})"
                ));
            }
            Event::Checkpoint {
                kind,
                path,
                bytes,
                ms,
                ..
            } => {
                if kind != "best" {
                    self.println(&format!(
                        "saved {kind} checkpoint {path} ({}, {ms:.0} ms)",
                        human_bytes(*bytes as f64)
                    ));
                }
            }
            Event::Sample { .. } => {}
            Event::Warning { message } => self.println(&format!("warning: {message}")),
            Event::RunEnd {
                reason,
                wall_s,
                updates,
                mean_ms_per_update,
                median_ms_per_update,
                tokens_per_s,
                gflops_per_s,
                peak_rss_bytes,
                ..
            } => {
                if let Some(b) = self.bar.take() {
                    b.finish_and_clear();
                }
                let rss = peak_rss_bytes
                    .map(|b| format!(" | peak memory {}", human_bytes(b as f64)))
                    .unwrap_or_default();
                eprintln!(
                    "{reason}: {updates} updates in {wall_s:.1}s | {mean_ms_per_update:.1} ms/update mean, {median_ms_per_update:.1} median | {:.1}k tok/s | {gflops_per_s:.1} GFLOP/s{rss}",
                    tokens_per_s / 1e3
                );
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        Ok(())
    }
}

/// Keeps every event in memory (tests, and callers that inspect a run).
#[derive(Debug, Default, Clone)]
pub struct MemorySink {
    pub events: std::sync::Arc<std::sync::Mutex<Vec<Event>>>,
}

impl EventSink for MemorySink {
    fn emit(&mut self, event: &Event) -> Result<()> {
        if let Ok(mut v) = self.events.lock() {
            v.push(event.clone());
        }
        Ok(())
    }
}
