//! What the dashboard shows, folded from the event stream: the run's header, loss curves,
//! the latest update's figures, the block breakdown, CPU, memory and power series, the latest
//! sample and a log.

use crate::telemetry::events::{EndReason, Event, Record};
use crate::telemetry::{CheckpointKind, LossKind};

/// Where the run stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// No events yet.
    Waiting,
    Running,
    Ended(EndReason),
    Failed(String),
}

/// The latest update.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Latest {
    pub step: u64,
    pub total: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub loss_scale: Option<f64>,
    pub ms: f64,
    pub tokens_per_s: f64,
    pub tokens_seen: u64,
    pub compacted: bool,
}

/// Everything the panels draw.
#[derive(Debug, Clone)]
pub struct RunView {
    pub status: Status,
    pub run_dir: String,
    /// One line each: model, shapes, backend, data.
    pub header: Vec<String>,
    pub flops_per_update: f64,
    pub tokens_per_update: f64,
    /// `(step, tokens seen, loss)` of every update and of every evaluation.
    pub train: Vec<(f64, f64, f64)>,
    pub val: Vec<(f64, f64, f64)>,
    pub best_val: Option<f64>,
    pub latest: Option<Latest>,
    /// Mean milliseconds of recent updates (for the ETA).
    pub recent_ms: Vec<f64>,
    /// Block name and milliseconds of the latest update.
    pub kernels: Vec<(String, f64)>,
    /// `(step, value)` series.
    pub cpu: Vec<(f64, f64)>,
    pub rss: Vec<(f64, f64)>,
    pub power: Vec<(f64, f64)>,
    pub power_source: Option<String>,
    pub energy_per_token: Option<f64>,
    pub sample: Option<(u64, String)>,
    pub log: Vec<String>,
    /// Unix times of the first event and of the latest.
    pub started: Option<f64>,
    pub last_time: Option<f64>,
    /// Wall seconds of a finished run.
    pub wall_s: Option<f64>,
    pub skipped_updates: u64,
    /// Lines of the event file that could not be read.
    pub unreadable_lines: usize,
    /// The machine's measured peak (e.g. from `handgrad bench matmul`), for the MFU.
    pub peak_gflops: Option<f64>,
}

impl Default for RunView {
    fn default() -> Self {
        RunView {
            status: Status::Waiting,
            run_dir: String::new(),
            header: Vec::new(),
            flops_per_update: 0.0,
            tokens_per_update: 0.0,
            train: Vec::new(),
            val: Vec::new(),
            best_val: None,
            latest: None,
            recent_ms: Vec::new(),
            kernels: Vec::new(),
            cpu: Vec::new(),
            rss: Vec::new(),
            power: Vec::new(),
            power_source: None,
            energy_per_token: None,
            sample: None,
            log: Vec::new(),
            started: None,
            last_time: None,
            wall_s: None,
            skipped_updates: 0,
            unreadable_lines: 0,
            peak_gflops: None,
        }
    }
}

/// Most log lines kept.
const LOG_LINES: usize = 500;

fn human(n: f64) -> String {
    if n >= 1e9 {
        format!("{:.2}G", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}K", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

impl RunView {
    /// A view of the records so far.
    pub fn from_records(records: &[Record]) -> Self {
        let mut v = RunView::default();
        for r in records {
            v.apply(r);
        }
        v
    }

    fn log(&mut self, line: String) {
        self.log.push(line);
        if self.log.len() > LOG_LINES {
            self.log.remove(0);
        }
    }

    /// `run_start`: the header, the rates the charts need, the first log lines.
    fn on_run_start(&mut self, event: &Event) {
        let Event::RunStart {
            run_dir,
            model,
            train,
            params,
            data,
            backend,
            tokens_per_update,
            flops_per_update,
            resumed_from_step,
            power_source,
            notes,
            ..
        } = event
        else {
            return;
        };
        self.status = Status::Running;
        self.run_dir = run_dir.clone();
        let arch = model.arch.hf_class();
        self.header = vec![
            format!(
                "{arch}: {} params ({} non-embedding) | dim {} | {} layers | {}/{} heads x {} | ffn {} | vocab {}",
                human(params.total as f64),
                human(params.non_embedding as f64),
                model.dim,
                model.n_layers,
                model.n_heads,
                model.n_kv_heads,
                model.head_dim,
                model.ffn_dim,
                model.vocab_size
            ),
            format!(
                "batch {} x seq {} x accum {} = {} tokens/update | {} updates | backend {} {}",
                train.batch,
                train.seq,
                train.accum,
                tokens_per_update,
                train.steps,
                backend.backend,
                backend.precision
            ),
            format!(
                "data {} ({} train / {} val tokens)",
                data.source,
                human(data.train_tokens as f64),
                human(data.val_tokens as f64)
            ),
        ];
        self.flops_per_update = *flops_per_update;
        self.tokens_per_update = *tokens_per_update as f64;
        self.power_source = power_source.clone();
        match resumed_from_step {
            Some(s) => self.log(format!("resumed at update {s}")),
            None => self.log(format!("started {run_dir}")),
        }
        for n in notes {
            self.log(format!("note: {n}"));
        }
    }

    /// `step`: the series, the latest figures and the kernel times.
    fn on_step(&mut self, event: &Event) {
        let Event::Step {
            step,
            total_steps,
            loss,
            loss_kind,
            lr,
            grad_norm,
            ms,
            tokens_per_s,
            tokens_seen,
            kernels,
            rss_bytes,
            loss_scale,
            skipped,
            cpu_percent,
            power_w,
            energy_j_per_token,
            ..
        } = event
        else {
            return;
        };
        self.status = Status::Running;
        let s = *step as f64;
        if loss.is_finite() {
            self.train.push((s, *tokens_seen as f64, *loss));
        }
        if *skipped {
            self.skipped_updates += 1;
        }
        self.latest = Some(Latest {
            step: *step,
            total: *total_steps,
            loss: *loss,
            lr: *lr,
            grad_norm: *grad_norm,
            loss_scale: *loss_scale,
            ms: *ms,
            tokens_per_s: *tokens_per_s,
            tokens_seen: *tokens_seen,
            compacted: *loss_kind == LossKind::Compacted,
        });
        self.recent_ms.push(*ms);
        if self.recent_ms.len() > 20 {
            self.recent_ms.remove(0);
        }
        if !kernels.is_empty() {
            self.kernels = kernels.iter().map(|k| (k.kernel.into(), k.ms)).collect();
        }
        if let Some(b) = rss_bytes {
            self.rss.push((s, *b as f64));
        }
        if let Some(c) = cpu_percent {
            self.cpu.push((s, *c));
        }
        if let Some(p) = power_w {
            self.power.push((s, *p));
        }
        if energy_j_per_token.is_some() {
            self.energy_per_token = *energy_j_per_token;
        }
    }

    /// Folds one record in.
    pub fn apply(&mut self, r: &Record) {
        self.started.get_or_insert(r.time);
        self.last_time = Some(r.time);
        match &r.event {
            Event::RunStart { .. } => self.on_run_start(&r.event),
            Event::Step { .. } => self.on_step(&r.event),
            Event::Eval {
                step,
                val_loss,
                best_val_loss,
                ..
            } => {
                let tokens = self.latest.as_ref().map_or(0.0, |l| l.tokens_seen as f64);
                if val_loss.is_finite() {
                    self.val.push((*step as f64, tokens, *val_loss));
                }
                self.best_val = Some(*best_val_loss);
                self.log(format!(
                    "update {step}: val loss {val_loss:.4} (best {best_val_loss:.4})"
                ));
            }
            Event::Checkpoint {
                step, kind, bytes, ..
            } => {
                if *kind != CheckpointKind::Best {
                    self.log(format!(
                        "update {step}: saved {} checkpoint ({})",
                        kind.name(),
                        crate::telemetry::console::human_bytes(*bytes as f64)
                    ));
                } else {
                    self.log(format!("update {step}: new best checkpoint"));
                }
            }
            Event::Sample { step, text, .. } => {
                self.sample = Some((*step, text.clone()));
            }
            Event::Info { message } => self.log(message.trim().to_string()),
            Event::Warning { message } => self.log(format!("warning: {message}")),
            Event::Restart { step, reason, .. } => {
                self.log(format!("update {step}: restarting: {reason}"))
            }
            Event::RunError { step, message } => {
                self.status = Status::Failed(message.clone());
                self.log(format!("update {step}: error: {message}"));
            }
            Event::RunEnd { reason, wall_s, .. } => {
                self.status = Status::Ended(*reason);
                self.wall_s = Some(*wall_s);
                self.log(format!("run {} after {wall_s:.1}s", reason.name()));
            }
        }
    }

    /// Seconds since the run started (a finished run: its wall time).
    pub fn elapsed(&self, now: f64) -> f64 {
        match (&self.status, self.started, self.last_time) {
            (Status::Running, Some(s), _) => (now - s).max(0.0),
            (_, Some(s), Some(l)) => self.wall_s.unwrap_or(l - s),
            _ => 0.0,
        }
    }

    /// Seconds to go at the recent pace (running runs only).
    pub fn eta(&self) -> Option<f64> {
        let l = self.latest.as_ref()?;
        if self.status != Status::Running || self.recent_ms.is_empty() {
            return None;
        }
        let mean = self.recent_ms.iter().sum::<f64>() / self.recent_ms.len() as f64;
        Some(l.total.saturating_sub(l.step) as f64 * mean / 1e3)
    }

    /// Achieved GFLOP/s of the latest update.
    pub fn gflops(&self) -> Option<f64> {
        let l = self.latest.as_ref()?;
        (l.ms > 0.0 && self.flops_per_update > 0.0)
            .then(|| self.flops_per_update / (l.ms / 1e3) / 1e9)
    }
}
