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
        stop_ids: Vec::new(),
        prompt: "Once upon a time".into(),
        max_tokens: 80,
        sampling: crate::generate::Sampling::TopK {
            k: 50,
            temperature: 0.8,
        },
        seed: step,
        add_bos: true,
        weights: crate::generate::WeightFormat::Fp32,
        kv_cache: crate::generate::KvFormat::F32,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| Error::invalid(format!("cannot start a thread: {e}")))?;
    let g = pool.install(|| {
        crate::generate::generate(
            &model,
            &m.params,
            &crate::backend::CpuKernels,
            tok.as_ref(),
            &opts,
            &mut |_| std::ops::ControlFlow::Continue(()),
        )
    })?;
    Ok((step, format!("{}{}", opts.prompt, g.text)))
}

/// Runs the dashboard until the user quits. Returns how the run it started ended (or its
/// error).
pub fn run(o: Options) -> Result<Exit> {
    check_run_folder(&o)?;
    if !std::io::stdout().is_terminal() {
        return Err(Error::invalid(
            "the dashboard needs a terminal (stdout is not one); follow the run with `tail -f RUN_DIR/events.jsonl` instead",
        ));
    }
    let mut guard = TerminalGuard::enter()?;
    let mut s = Session::new(o);
    loop {
        s.poll_events()?;
        s.take_sample();
        if s.watch_training()? == Next::Leave {
            break;
        }
        s.ui.now = crate::telemetry::events::unix_now();
        s.ui.can_resume = s.o.training.is_none()
            && s.o.resume_options.is_some()
            && matches!(s.view.status, Status::Ended(_) | Status::Failed(_));
        guard
            .terminal
            .draw(|f| render::draw(f, &s.view, &s.ui))
            .map_err(|e| Error::invalid(format!("cannot draw: {e}")))?;
        if !event::poll(Duration::from_millis(150)).unwrap_or(false) {
            continue;
        }
        let Ok(TermEvent::Key(k)) = event::read() else {
            continue;
        };
        if k.kind == KeyEventKind::Press && s.on_key(k) == Next::Leave {
            break;
        }
    }
    drop(guard);
    let ctrl_c = s.ctrl_c_pressed;
    s.result.map(|outcome| Exit { outcome, ctrl_c })
}

/// Refuses a folder that does not exist or holds something else than a run (unless the
/// dashboard starts the run itself).
fn check_run_folder(o: &Options) -> Result<()> {
    let run = crate::run::RunDir::new(&o.run_dir);
    if !o.run_dir.exists() && o.training.is_none() {
        return Err(Error::invalid(format!(
            "{} does not exist",
            o.run_dir.display()
        )));
    }
    if o.run_dir.is_dir()
        && o.training.is_none()
        && !run.events().exists()
        && !run.checkpoints().exists()
        && std::fs::read_dir(&o.run_dir).is_ok_and(|mut d| d.next().is_some())
    {
        return Err(Error::invalid(format!(
            "{} is not a run folder (no events.jsonl or checkpoints/)",
            o.run_dir.display()
        )));
    }
    Ok(())
}

/// Whether the dashboard goes on after a step of its loop.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Stay,
    Leave,
}

/// What the dashboard keeps between frames.
struct Session {
    o: Options,
    events: PathBuf,
    follower: Follower,
    view: RunView,
    ui: UiState,
    sampling: Option<Receiver<Result<(u64, String)>>>,
    last_sample_step: u64,
    quitting: bool,
    ctrl_c_pressed: bool,
    result: Result<Option<TrainOutcome>>,
}

impl Session {
    fn new(o: Options) -> Self {
        let events = crate::run::RunDir::new(&o.run_dir).events();
        Session {
            follower: Follower::new(&events),
            view: RunView {
                peak_gflops: o.peak_gflops,
                ..RunView::default()
            },
            events,
            o,
            ui: UiState::default(),
            sampling: None,
            last_sample_step: 0,
            quitting: false,
            ctrl_c_pressed: false,
            result: Ok(None),
        }
    }

    /// New events (a scrolled or paused log keeps showing the same lines); a sample is
    /// started every `--sample-every` updates, at a checkpoint.
    fn poll_events(&mut self) -> Result<()> {
        let log_len = self.view.log.len();
        for r in self.follower.poll()? {
            if let Event::Checkpoint { step, .. } = &r.event
                && self.o.sample_every > 0
                && *step >= self.last_sample_step + self.o.sample_every
                && self.sampling.is_none()
            {
                self.last_sample_step = *step;
                self.sampling = Some(start_sample(&self.o.run_dir));
            }
            self.view.apply(&r);
        }
        self.view.unreadable_lines = self.follower.skipped;
        if self.ui.paused || self.ui.log_scroll > 0 {
            let added = self.view.log.len().saturating_sub(log_len);
            self.ui.log_scroll = (self.ui.log_scroll + added).min(self.view.log.len());
        }
        Ok(())
    }

    /// A finished sample.
    fn take_sample(&mut self) {
        let Some(rx) = &self.sampling else {
            return;
        };
        let Ok(res) = rx.try_recv() else {
            return;
        };
        match res {
            Ok(s) => {
                self.view.sample = Some(s);
                self.ui.notice = None;
            }
            Err(e) => self.ui.notice = Some(format!("sample: {e}")),
        }
        self.sampling = None;
    }

    /// The training run this dashboard started: when it has ended, its outcome.
    fn watch_training(&mut self) -> Result<Next> {
        let Some(t) = self.o.training.take_if(|t| t.thread.is_finished()) else {
            return Ok(Next::Stay);
        };
        let outcome = t
            .thread
            .join()
            .map_err(|_| Error::invalid("the training thread panicked"))?;
        match outcome {
            Ok(out) => {
                self.ui.notice = Some(format!("run {} at update {}", out.reason.name(), out.step));
                self.result = Ok(Some(out));
            }
            Err(e) => {
                // Nothing was written (bad input) or the run failed: leave and say why.
                if !self.events.exists() || self.quitting {
                    self.result = Err(e);
                    return Ok(Next::Leave);
                }
                self.ui.notice = Some(format!("error: {e}"));
            }
        }
        Ok(if self.quitting {
            Next::Leave
        } else {
            Next::Stay
        })
    }

    /// A key press.
    fn on_key(&mut self, k: crossterm::event::KeyEvent) -> Next {
        let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
        let ui = &mut self.ui;
        match k.code {
            _ if ctrl_c || k.code == KeyCode::Char('q') || k.code == KeyCode::Esc => {
                self.ctrl_c_pressed |= ctrl_c;
                match &self.o.training {
                    Some(t) => {
                        t.stop.store(true, Ordering::SeqCst);
                        self.quitting = true;
                        ui.notice = Some("finishing this update and saving...".into());
                    }
                    None => return Next::Leave,
                }
            }
            KeyCode::Char('g') if self.sampling.is_none() => {
                ui.notice = Some("generating from the latest checkpoint...".into());
                self.sampling = Some(start_sample(&self.o.run_dir));
            }
            KeyCode::Char('p') => {
                ui.paused = !ui.paused;
                if !ui.paused {
                    ui.log_scroll = 0;
                }
            }
            KeyCode::Up => ui.log_scroll = (ui.log_scroll + 1).min(self.view.log.len()),
            KeyCode::Down => ui.log_scroll = ui.log_scroll.saturating_sub(1),
            KeyCode::PageUp => ui.log_scroll = (ui.log_scroll + 10).min(self.view.log.len()),
            KeyCode::PageDown => ui.log_scroll = ui.log_scroll.saturating_sub(10),
            KeyCode::Char('r') if ui.can_resume => self.resume(),
            _ => {}
        }
        Next::Stay
    }

    /// `r`: resumes the stopped run in a training thread of this dashboard.
    fn resume(&mut self) {
        let Some(make) = &self.o.resume_options else {
            return;
        };
        let mut opts = make(&self.o.run_dir);
        opts.resume = true;
        opts.console = crate::telemetry::ConsoleMode::Off;
        let stop = Arc::new(AtomicBool::new(false));
        opts.stop_flag = Some(stop.clone());
        let thread = std::thread::spawn(move || crate::train::train(TrainConfig::default(), opts));
        self.o.training = Some(Training { stop, thread });
        self.ui.notice = Some("resuming...".into());
    }
}

fn start_sample(run_dir: &Path) -> Receiver<Result<(u64, String)>> {
    let (tx, rx) = channel();
    let dir = run_dir.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(sample_from_latest(&dir));
    });
    rx
}
