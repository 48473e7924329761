//! The terminal dashboard: `handgrad dashboard RUN_DIR` follows a run's `events.jsonl` (live or
//! finished); `handgrad train --dashboard` starts a run and shows it. Keys: q quit (a run the
//! dashboard started saves and stops first), g generate a sample from the latest checkpoint, p
//! pause the log, arrows and page keys scroll it, r resume a stopped run. The terminal is
//! restored on exit, on Ctrl-C and on a panic.

pub mod render;
pub mod state;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use crossterm::event::{self, Event as TermEvent, KeyCode, KeyEventKind, KeyModifiers};
use crossterm::terminal::{EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;

use self::render::UiState;
use self::state::{RunView, Status};
use crate::error::{Error, Result};
use crate::telemetry::Event;
use crate::telemetry::reader::Follower;
use crate::train::{RunOptions, TrainConfig, TrainOutcome};

/// A training run the dashboard started.
pub struct Training {
    pub stop: Arc<AtomicBool>,
    pub thread: JoinHandle<Result<TrainOutcome>>,
}

/// Makes the settings of a run resumed with `r` (threads, cache) for a run folder.
pub type ResumeOptions = Box<dyn Fn(&Path) -> RunOptions>;

/// What `run` needs.
pub struct Options {
    pub run_dir: PathBuf,
    /// The run this dashboard started, if any.
    pub training: Option<Training>,
    /// Generate a sample from the latest checkpoint every this many updates (0: only on `g`).
    pub sample_every: u64,
    /// The machine's peak GFLOP/s, to show the model FLOP utilisation (MFU).
    pub peak_gflops: Option<f64>,
    /// How `r` resumes a stopped run (threads, cache).
    pub resume_options: Option<ResumeOptions>,
}

/// How the dashboard ended.
pub struct Exit {
    /// How the run it started (or resumed) ended, if it did.
    pub outcome: Option<TrainOutcome>,
    /// The user left with Ctrl-C (the CLI then exits 130, as on the plain console), not `q`.
    pub ctrl_c: bool,
}

/// Restores the terminal when dropped (and on a panic).
struct TerminalGuard {
    terminal: Terminal<CrosstermBackend<std::io::Stdout>>,
}

fn restore() {
    let _ = crossterm::terminal::disable_raw_mode();
    let _ = crossterm::execute!(
        std::io::stdout(),
        LeaveAlternateScreen,
        crossterm::cursor::Show
    );
}

impl TerminalGuard {
    fn enter() -> Result<Self> {
        let term_err =
            |e: std::io::Error| Error::invalid(format!("cannot set up the terminal: {e}"));
        crossterm::terminal::enable_raw_mode().map_err(term_err)?;
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            prev(info);
        }));
        crossterm::execute!(
            std::io::stdout(),
            EnterAlternateScreen,
            crossterm::cursor::Hide
        )
        .map_err(term_err)?;
        let terminal = Terminal::new(CrosstermBackend::new(std::io::stdout())).map_err(term_err)?;
        Ok(TerminalGuard { terminal })
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Generates a short sample from the newest checkpoint of a run, on one thread.
pub fn sample_from_latest(run_dir: &Path) -> Result<(u64, String)> {
    let run = crate::run::RunDir::new(run_dir);
    let path = [run.latest(), run.latest_prev(), run.best()]
        .into_iter()
        .find(|p| p.exists())
        .ok_or_else(|| Error::invalid("no checkpoint yet"))?;
    let step = crate::formats::checkpoint::Checkpoint::load(&path)
        .map(|c| c.meta.step)
        .unwrap_or(0);
    let m = crate::formats::load_model(&path)?;
    let tok = match &m.tokenizer {
        Some(t) => t.load(&path)?,
        None => return Err(Error::invalid("the checkpoint has no tokenizer")),
    };
    let model = m.transformer();
    let opts = crate::generate::GenerateOptions {
        prompt: "Once upon a time".into(),
        max_tokens: 80,
        sampling: crate::generate::Sampling::TopK {
            k: 50,
            temperature: 0.8,
        },
        seed: step,
        add_bos: true,
        weights: crate::generate::WeightFormat::Fp32,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| Error::invalid(format!("cannot start a thread: {e}")))?;
    let g = pool.install(|| {
        crate::generate::generate(
            &model,
            &m.params,
            &crate::backend::cpu::CpuKernels,
            tok.as_ref(),
            &opts,
            &mut |_| std::ops::ControlFlow::Continue(()),
        )
    })?;
    Ok((step, format!("{}{}", opts.prompt, g.text)))
}

/// Runs the dashboard until the user quits. Returns how the run it started ended (or its
/// error).
pub fn run(mut o: Options) -> Result<Exit> {
    let run = crate::run::RunDir::new(&o.run_dir);
    let events = run.events();
    if !o.run_dir.exists() && o.training.is_none() {
        return Err(Error::invalid(format!(
            "{} does not exist",
            o.run_dir.display()
        )));
    }
    if o.run_dir.is_dir()
        && o.training.is_none()
        && !events.exists()
        && !run.checkpoints().exists()
        && std::fs::read_dir(&o.run_dir).is_ok_and(|mut d| d.next().is_some())
    {
        return Err(Error::invalid(format!(
            "{} is not a run folder (no events.jsonl or checkpoints/)",
            o.run_dir.display()
        )));
    }
    if !std::io::stdout().is_terminal() {
        return Err(Error::invalid(
            "the dashboard needs a terminal (stdout is not one); follow the run with `tail -f RUN_DIR/events.jsonl` instead",
        ));
    }
    let mut guard = TerminalGuard::enter()?;
    let mut follower = Follower::new(&events);
    let mut view = RunView {
        peak_gflops: o.peak_gflops,
        ..RunView::default()
    };
    let mut ui = UiState::default();
    let mut sampling: Option<Receiver<Result<(u64, String)>>> = None;
    let mut last_sample_step = 0u64;
    let mut quitting = false;
    let mut ctrl_c_pressed = false;
    let mut result = Ok(None);
    loop {
        // New events (a scrolled or paused log keeps showing the same lines).
        let log_len = view.log.len();
        for r in follower.poll()? {
            if let Event::Checkpoint { step, .. } = &r.event
                && o.sample_every > 0
                && *step >= last_sample_step + o.sample_every
                && sampling.is_none()
            {
                last_sample_step = *step;
                sampling = Some(start_sample(&o.run_dir));
            }
            view.apply(&r);
        }
        view.unreadable_lines = follower.skipped;
        if ui.paused || ui.log_scroll > 0 {
            let added = view.log.len().saturating_sub(log_len);
            ui.log_scroll = (ui.log_scroll + added).min(view.log.len());
        }
        // A finished sample.
        if let Some(rx) = &sampling
            && let Ok(res) = rx.try_recv()
        {
            match res {
                Ok(s) => {
                    view.sample = Some(s);
                    ui.notice = None;
                }
                Err(e) => ui.notice = Some(format!("sample: {e}")),
            }
            sampling = None;
        }
        // The training run this dashboard started.
        if o.training.as_ref().is_some_and(|t| t.thread.is_finished()) {
            let t = o.training.take().expect("checked above");
            let outcome = t
                .thread
                .join()
                .map_err(|_| Error::invalid("the training thread panicked"))?;
            match outcome {
                Ok(out) => {
                    ui.notice = Some(format!("run {} at update {}", out.reason.name(), out.step));
                    result = Ok(Some(out));
                }
                Err(e) => {
                    // Nothing was written (bad input) or the run failed: leave and say why.
                    if !events.exists() || quitting {
                        result = Err(e);
                        break;
                    }
                    ui.notice = Some(format!("error: {e}"));
                }
            }
            if quitting {
                break;
            }
        }
        ui.now = crate::telemetry::events::unix_now();
        ui.can_resume = o.training.is_none()
            && o.resume_options.is_some()
            && matches!(view.status, Status::Ended(_) | Status::Failed(_));
        guard
            .terminal
            .draw(|f| render::draw(f, &view, &ui))
            .map_err(|e| Error::invalid(format!("cannot draw: {e}")))?;
        // Keys.
        if !event::poll(Duration::from_millis(150)).unwrap_or(false) {
            continue;
        }
        let Ok(TermEvent::Key(k)) = event::read() else {
            continue;
        };
        if k.kind != KeyEventKind::Press {
            continue;
        }
        let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
        match k.code {
            _ if ctrl_c || k.code == KeyCode::Char('q') || k.code == KeyCode::Esc => {
                ctrl_c_pressed |= ctrl_c;
                match &o.training {
                    Some(t) => {
                        t.stop.store(true, Ordering::SeqCst);
                        quitting = true;
                        ui.notice = Some("finishing this update and saving...".into());
                    }
                    None => break,
                }
            }
            KeyCode::Char('g') if sampling.is_none() => {
                ui.notice = Some("generating from the latest checkpoint...".into());
                sampling = Some(start_sample(&o.run_dir));
            }
            KeyCode::Char('p') => {
                ui.paused = !ui.paused;
                if !ui.paused {
                    ui.log_scroll = 0;
                }
            }
            KeyCode::Up => ui.log_scroll = (ui.log_scroll + 1).min(view.log.len()),
            KeyCode::Down => ui.log_scroll = ui.log_scroll.saturating_sub(1),
            KeyCode::PageUp => ui.log_scroll = (ui.log_scroll + 10).min(view.log.len()),
            KeyCode::PageDown => ui.log_scroll = ui.log_scroll.saturating_sub(10),
            KeyCode::Char('r') if ui.can_resume => {
                if let Some(make) = &o.resume_options {
                    let mut opts = make(&o.run_dir);
                    opts.resume = true;
                    opts.console = crate::telemetry::ConsoleMode::Off;
                    let stop = Arc::new(AtomicBool::new(false));
                    opts.stop_flag = Some(stop.clone());
                    let thread = std::thread::spawn(move || {
                        crate::train::train(TrainConfig::default(), opts)
                    });
                    o.training = Some(Training { stop, thread });
                    ui.notice = Some("resuming...".into());
                }
            }
            _ => {}
        }
    }
    drop(guard);
    result.map(|outcome| Exit {
        outcome,
        ctrl_c: ctrl_c_pressed,
    })
}

fn start_sample(run_dir: &Path) -> Receiver<Result<(u64, String)>> {
    let (tx, rx) = channel();
    let dir = run_dir.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(sample_from_latest(&dir));
    });
    rx
}
