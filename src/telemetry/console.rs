//! The console renderer: a progress bar on a terminal, plain lines otherwise, on stderr; the
//! generated sample goes to stdout.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressStyle};

use super::events::{CheckpointKind, Event, LossKind, Record};
use super::sinks::EventSink;
use crate::error::Result;
use crate::model::config::human_count;

/// How the console shows progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleMode {
    /// A progress bar (terminals).
    Bar,
    /// One line every so often (logs, pipes).
    Lines,
    /// Nothing but warnings and the final sample.
    Quiet,
    /// Nothing at all (another display owns the terminal).
    Off,
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

/// Renders events for people.
pub struct ConsoleSink {
    mode: ConsoleMode,
    bar: Option<ProgressBar>,
    last_line: std::time::Instant,
}

impl ConsoleSink {
    /// A console renderer.
    pub fn new(mode: ConsoleMode) -> Self {
        ConsoleSink {
            mode,
            bar: None,
            last_line: std::time::Instant::now(),
        }
    }

    /// A line on stderr that does not tear the progress bar. A closed stderr is an error (the
    /// bus then detaches this sink; training goes on).
    fn println(&self, s: &str) -> Result<()> {
        match &self.bar {
            Some(b) => {
                b.println(s);
                Ok(())
            }
            None => line_to(&mut std::io::stderr(), s),
        }
    }

    fn run_start(&mut self, e: &Event) -> Result<()> {
        let Event::RunStart {
            run_dir,
            params,
            data,
            backend,
            tokens_per_update,
            activation_bytes,
            threads,
            vocab_compacted_to,
            resumed_from_step,
            notes,
            train,
            ..
        } = e
        else {
            return Ok(());
        };
        let total = train.steps as u64;
        let mut s = format!(
            "run {run_dir}: {} parameters ({} non-embedding), {} tokens/update, {} threads, activations {}",
            human_count(params.total),
            human_count(params.non_embedding),
            tokens_per_update,
            threads,
            human_bytes(*activation_bytes as f64),
        );
        s += &format!(
            "\nbackend {} {}: {}",
            backend.backend, backend.precision, backend.details
        );
        if !backend.kernels.is_empty() {
            let on: Vec<&str> = backend
                .kernels
                .iter()
                .filter(|k| k.on != "cpu")
                .map(|k| k.kernel.as_str())
                .collect();
            s += &format!(
                "\nkernels on {}: {}",
                backend.backend,
                if on.is_empty() {
                    "none".to_string()
                } else {
                    on.join(", ")
                }
            );
            for k in backend.kernels.iter().filter(|k| k.on == "cpu") {
                s += &format!(
                    "\nkernel {} on the CPU: {}",
                    k.kernel,
                    k.reason.as_deref().unwrap_or("")
                );
            }
        }
        s += &format!(
            "\ndata {}: {} train / {} val tokens, split {}",
            data.source, data.train_tokens, data.val_tokens, data.split
        );
        if let Some(v) = vocab_compacted_to {
            s += &format!(
                "\nvocabulary compaction: classifier over {v} ids (losses are compacted, not full-vocabulary)"
            );
        }
        for n in notes {
            s += &format!("\nnote: {n}");
        }
        if let Some(st) = resumed_from_step {
            s += &format!("\nresuming at update {st}");
        }
        line_to(&mut std::io::stderr(), &s)?;
        if self.mode == ConsoleMode::Bar {
            let bar = ProgressBar::new(total);
            bar.set_style(
                // `wide_msg` takes what is left of the terminal's width and is cut there, so
                // the line never wraps (at 80 columns the loss and speed still show).
                ProgressStyle::with_template(
                    "{spinner:.green} {pos}/{len} {bar:20.cyan/blue} eta {eta} {wide_msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_position(resumed_from_step.unwrap_or(0));
            self.bar = Some(bar);
        }
        Ok(())
    }

    fn step(&mut self, e: &Event) -> Result<()> {
        let Event::Step {
            step,
            total_steps,
            loss,
            lr,
            grad_norm,
            ms,
            tokens_per_s,
            loss_scale,
            skipped,
            accelerator,
            ..
        } = e
        else {
            return Ok(());
        };
        // Most important first: a narrow terminal cuts the end.
        let mut msg = format!(
            "loss {loss:.4} | {:.1}k tok/s | {ms:.0} ms | lr {lr:.2e} | gnorm {grad_norm:.2}",
            tokens_per_s / 1e3
        );
        if let Some(a) = accelerator {
            msg += &format!(
                " | kernels {:.0} ms, staging {:.0} ms, cpu {:.0} ms",
                a.kernel_ms, a.staging_ms, a.cpu_ms
            );
        }
        if let Some(s) = loss_scale {
            msg += &format!(" | scale {s}");
        }
        if *skipped {
            msg += " | skipped (overflow)";
        }
        match &self.bar {
            Some(b) => {
                b.set_position(*step);
                b.set_message(msg);
            }
            None => {
                let due = self.last_line.elapsed().as_secs_f64() >= 5.0;
                if due || *step == 1 || step == total_steps || step % 100 == 0 {
                    self.last_line = std::time::Instant::now();
                    line_to(
                        &mut std::io::stderr(),
                        &format!("step {step}/{total_steps} | {msg}"),
                    )?;
                }
            }
        }
        Ok(())
    }

    fn run_end(&mut self, e: &Event) -> Result<()> {
        let Event::RunEnd {
            reason,
            wall_s,
            updates,
            mean_ms_per_update,
            median_ms_per_update,
            tokens_per_s,
            gflops_per_s,
            peak_rss_bytes,
            ..
        } = e
        else {
            return Ok(());
        };
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        let rss = peak_rss_bytes
            .map(|b| format!(" | peak memory {}", human_bytes(b as f64)))
            .unwrap_or_default();
        line_to(
            &mut std::io::stderr(),
            &format!(
                "{}: {updates} updates in {wall_s:.1}s | {mean_ms_per_update:.1} ms/update mean, {median_ms_per_update:.1} median | {:.1}k tok/s | {gflops_per_s:.1} GFLOP/s{rss}",
                reason.name(),
                tokens_per_s / 1e3
            ),
        )
    }

    fn sample(&self, prompt_and_text: &str) -> Result<()> {
        let text = format!("--- sample (temperature 0.8, top-k 50) ---\n{prompt_and_text}\n---");
        match &self.bar {
            Some(b) => b.suspend(|| line_to(&mut std::io::stdout(), &text)),
            None => line_to(&mut std::io::stdout(), &text),
        }
    }
}

/// Writes a line and flushes; a closed stream (a pipe whose reader left) is an error.
fn line_to(w: &mut dyn Write, s: &str) -> Result<()> {
    writeln!(w, "{s}")
        .and_then(|()| w.flush())
        .map_err(|e| crate::Error::io("writing to", "the console", e))
}

/// Bytes for people: KB, MB or GB.
pub fn human_bytes(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} KB", b / 1e3)
    }
}

impl EventSink for ConsoleSink {
    fn name(&self) -> String {
        "console".into()
    }

    fn emit(&mut self, record: &Record) -> Result<()> {
        let event = &record.event;
        if self.mode == ConsoleMode::Off {
            return Ok(());
        }
        if self.mode == ConsoleMode::Quiet {
            return match event {
                Event::Warning { message } => self.println(&format!("warning: {message}")),
                Event::Restart { reason, .. } => self.println(&format!("restarting: {reason}")),
                Event::Sample { text, .. } => self.sample(text),
                _ => Ok(()),
            };
        }
        match event {
            Event::RunStart { .. } => self.run_start(event),
            Event::Step { .. } => self.step(event),
            Event::Eval {
                step,
                val_loss,
                loss_kind,
                best_val_loss,
                ..
            } => {
                let kind = match loss_kind {
                    LossKind::Full => "",
                    LossKind::Compacted => " (compacted)",
                };
                self.println(&format!(
                    "step {step}: val loss {val_loss:.4}{kind} (best {best_val_loss:.4})"
                ))
            }
            Event::Checkpoint {
                kind,
                path,
                bytes,
                ms,
                ..
            } => {
                if *kind != CheckpointKind::Best {
                    self.println(&format!(
                        "saved {} checkpoint {path} ({}, {ms:.0} ms)",
                        kind.name(),
                        human_bytes(*bytes as f64)
                    ))
                } else {
                    Ok(())
                }
            }
            Event::Sample { text, .. } => self.sample(text),
            Event::Info { message } => self.println(message),
            Event::Warning { message } => self.println(&format!("warning: {message}")),
            Event::Restart { reason, .. } => self.println(&format!("restarting: {reason}")),
            // The CLI prints the error itself, in one line.
            Event::RunError { .. } => {
                if let Some(b) = self.bar.take() {
                    b.finish_and_clear();
                }
                Ok(())
            }
            Event::RunEnd { .. } => self.run_end(event),
        }
    }

    fn finish(&mut self) -> Result<()> {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        Ok(())
    }
}
