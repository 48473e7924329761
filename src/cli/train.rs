//! `handgrad train`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Args;

use super::backend_args::BackendArgs;
use crate::error::{Error, Result};
use crate::telemetry::{ConsoleMode, EndReason};
use crate::train::distributed::{self, Collective, Distributed};
use crate::train::{GivenFlags, RunOptions, TrainConfig, train};

/// Options of `handgrad train`: the run's settings ([`TrainConfig`], declared there) and this
/// invocation's. Defaults train the `small` preset on the built-in stories.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Start from the settings of a saved run: its `train_config.json`, or the run folder;
    /// the options given here change them (the run's seed, data and model included).
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "resume",
        help_heading = "Model and data"
    )]
    config: Option<PathBuf>,
    /// The run's settings (saved as its train_config.json).
    #[command(flatten)]
    train: TrainConfig,
    #[command(flatten, next_help_heading = "Backend")]
    backend: BackendArgs,
    /// With --backend ane: stop with an error when a kernel cannot run on the Neural Engine
    /// (the device rejects it, or its first evaluation disagrees with the simulator), instead
    /// of running that kernel on the CPU with a warning.
    #[arg(long, help_heading = "Backend")]
    ane_strict: bool,
    /// With --backend ane: when the Neural Engine compiler's per-process budget
    /// (HANDGRAD_ANE_COMPILE_BUDGET, default 100 compiles) would be passed, stop with an error
    /// instead of restarting the process to continue from the last checkpoint.
    #[arg(long, help_heading = "Backend")]
    no_restart: bool,
    /// Run folder (default: runs/MODEL-N, the first free N).
    #[arg(long, help_heading = "Run")]
    run_dir: Option<PathBuf>,
    /// Continue the run in --run-dir from its latest checkpoint, exactly where it stopped.
    #[arg(long, help_heading = "Run")]
    resume: bool,
    /// Stop after N updates in this invocation (saving a checkpoint); the schedule still spans
    /// --steps, so a later --resume continues the same run.
    #[arg(long, help_heading = "Run")]
    stop_after: Option<usize>,
    /// Worker threads (default: physical cores, shared out among the ranks of an MPI job on
    /// this machine).
    #[arg(long, help_heading = "Run")]
    threads: Option<usize>,
    /// Training on several processes: auto (MPI when started by mpirun/mpiexec/srun), none,
    /// or mpi. Each rank trains on --batch sequences of every micro-batch, and rank 0 writes
    /// the run; --distributed-mode says what the ranks exchange.
    #[arg(long, value_enum, default_value_t = Distributed::Auto, help_heading = "Several machines")]
    distributed: Distributed,
    /// Sum the gradients after the backward pass instead of each bucket as soon as the pass
    /// has completed it (same numbers; for measuring what the overlap saves).
    #[arg(long, help_heading = "Several machines")]
    no_overlap: bool,
    /// Largest bucket of gradients summed at once, in MB of f32 (smaller: earlier and more
    /// overlap, more messages).
    #[arg(
        long,
        default_value_t = 16.0,
        value_name = "MB",
        help_heading = "Several machines"
    )]
    bucket_mb: f64,
    /// Print plain progress lines instead of a progress bar.
    #[arg(long, help_heading = "Output and logging")]
    plain: bool,
    /// Print only warnings, errors and the sample.
    #[arg(long, short, help_heading = "Output and logging")]
    quiet: bool,
    /// Show the run in the terminal dashboard (q saves and stops; see `handgrad dashboard`).
    #[arg(long, conflicts_with_all = ["plain", "quiet"], help_heading = "Output and logging")]
    dashboard: bool,
    /// With --dashboard: generate a sample from the latest checkpoint every N updates.
    #[arg(long, default_value_t = 200, help_heading = "Output and logging")]
    sample_every: u64,
    /// With --dashboard: the machine's peak GFLOP/s (from `handgrad bench matmul`), to show MFU.
    #[arg(long, help_heading = "Output and logging")]
    peak_gflops: Option<f64>,
    /// Write TensorBoard event files into this folder (`tensorboard --logdir DIR`).
    #[arg(long, help_heading = "Output and logging")]
    tensorboard: Option<PathBuf>,
    /// Log to Weights & Biases (through a Python sidecar using the `wandb` package).
    #[arg(long, help_heading = "Output and logging")]
    wandb: bool,
    /// W&B project.
    #[arg(long, default_value = "handgrad", help_heading = "Output and logging")]
    wandb_project: String,
    /// W&B run name [default: the run folder's name].
    #[arg(long, help_heading = "Output and logging")]
    wandb_name: Option<String>,
    /// W&B mode: online, or offline (written locally; `wandb sync` uploads it).
    #[arg(long, value_enum, default_value_t = crate::telemetry::wandb::WandbMode::Online, help_heading = "Output and logging")]
    wandb_mode: crate::telemetry::wandb::WandbMode,
}

fn default_run_dir(model: &str) -> PathBuf {
    let stem: String = std::path::Path::new(model)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("run")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let stem = if stem == "config" {
        "model".to_string()
    } else {
        stem
    };
    (1..)
        .map(|i| PathBuf::from("runs").join(format!("{stem}-{i}")))
        .find(|p| !p.exists())
        .unwrap_or_else(|| PathBuf::from("runs").join(stem))
}

pub fn run(a: TrainArgs, given: GivenFlags) -> Result<()> {
    let (cfg, notes) = train_config(&a, &given)?;
    let mut opts = run_options(&a, &cfg, &given)?;
    opts.notes = notes;
    if a.resume {
        opts.given = given;
    }
    let ranks: Arc<dyn Collective> = Arc::from(distributed::connect(a.distributed)?);
    if ranks.size() > 1 {
        return run_rank(a, cfg, opts, ranks);
    }
    if a.dashboard {
        return with_dashboard(cfg, opts, a.sample_every, a.peak_gflops);
    }
    opts.stop_flag = Some(ctrl_c_flag());
    opts.restart_on_compile_budget = !a.no_restart;
    let outcome = match train(cfg, opts) {
        Err(Error::RestartProcess { restarts, .. }) => return restart_process(restarts),
        other => other?,
    };
    report(&outcome, a.quiet)
}

/// One rank of a data-parallel job. An error on any rank ends the whole job (the other ranks
/// would wait for it in the next gradient sum forever): it is printed with the rank, and MPI
/// aborts every process; rank 0's last checkpoint is intact (checkpoints are written
/// atomically).
fn run_rank(
    a: TrainArgs,
    cfg: TrainConfig,
    mut opts: RunOptions,
    ranks: Arc<dyn Collective>,
) -> Result<()> {
    if a.dashboard {
        return Err(Error::invalid(
            "--dashboard is not available in an MPI job: run `handgrad dashboard RUN_DIR` beside it",
        ));
    }
    if a.threads.is_none() {
        let local = distributed::local_ranks().unwrap_or(1);
        opts.threads = (crate::train::default_threads() / local).max(1);
    }
    opts.stop_flag = Some(ctrl_c_flag());
    opts.ranks = Some(ranks.clone());
    let rank = ranks.rank();
    match train(cfg, opts) {
        Ok(outcome) => {
            if rank == 0 {
                report(&outcome, a.quiet)?;
            }
            Ok(())
        }
        Err(Error::Interrupted) => Err(Error::Interrupted),
        Err(e) => {
            eprintln!(
                "error: rank {rank} of {}: {}; stopping every rank",
                ranks.size(),
                super::one_line(&e)
            );
            ranks.abort(1)
        }
    }
}

/// Restarts handgrad in this process's place (exec), with the same arguments, for a fresh
/// Neural Engine compiler (the trainer decided it: `train::compile_budget`). The trainer
/// prepares its kernels before anything of the run is written, so the new process starts (or
/// resumes) exactly as this one would have.
fn restart_process(restarts: u32) -> Result<()> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let exe =
        std::env::current_exe().map_err(|e| Error::io("finding the executable", "handgrad", e))?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(&args)
        .env(
            crate::train::compile_budget::RESTARTS_VAR,
            restarts.to_string(),
        )
        .env_remove(crate::backend::ane::runtime::COMPILES_USED_VAR);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let e = cmd.exec();
        Err(Error::io("re-executing", exe, e))
    }
    #[cfg(not(unix))]
    {
        let status = cmd
            .status()
            .map_err(|e| Error::io("re-executing", &exe, e))?;
        std::process::exit(status.code().unwrap_or(1));
    }
}

/// Trains in a thread and shows it in the dashboard (which owns the terminal meanwhile).
fn with_dashboard(
    cfg: TrainConfig,
    mut opts: RunOptions,
    sample_every: u64,
    peak_gflops: Option<f64>,
) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    opts.stop_flag = Some(stop.clone());
    opts.console = ConsoleMode::Off;
    let run_dir = opts.run_dir.clone();
    let thread = std::thread::spawn(move || train(cfg, opts));
    let exit = crate::dashboard::run(crate::dashboard::Options {
        run_dir,
        training: Some(crate::dashboard::Training { stop, thread }),
        sample_every,
        peak_gflops,
        resume_options: None,
    })?;
    if let Some(o) = exit.outcome {
        match report(&o, false) {
            // Quitting the dashboard with q saves and stops: not an error; Ctrl-C exits 130
            // below, as it does without the dashboard.
            Ok(()) | Err(Error::Interrupted) => {}
            Err(e) => return Err(e),
        }
    }
    if exit.ctrl_c {
        return Err(Error::Interrupted);
    }
    Ok(())
}

/// The training configuration the flags ask for (over a saved one with `--config`), and
/// notes on what was adjusted.
fn train_config(a: &TrainArgs, given: &GivenFlags) -> Result<(TrainConfig, Vec<String>)> {
    let backend = a.backend.resolve();
    let mut cfg = TrainConfig {
        backend: backend.kind,
        precision: backend.precision,
        ..a.train.clone()
    };
    if let (Some(init), false) = (&cfg.init_from, given.contains("model")) {
        // A pretrained model's config replaces --model; the run is named after it.
        cfg.model = init.clone();
    }
    if let Some(path) = &a.config {
        return Ok((
            crate::train::resume::with_given(path, &cfg, given)?,
            Vec::new(),
        ));
    }
    let mut notes = Vec::new();
    if cfg.warmup >= cfg.steps && !given.contains("warmup") {
        // Short runs: keep warmup to a tenth of the run unless the user chose otherwise. (A
        // resumed run keeps its own warmup; these settings start only a run that never
        // saved them.)
        let cut = cfg.warmup.min(cfg.steps / 10);
        if !a.resume {
            notes.push(format!(
                "warmup shortened from the default {} to {cut} updates for this {}-update run (give --warmup to choose)",
                cfg.warmup, cfg.steps
            ));
        }
        cfg.warmup = cut;
    }
    Ok((cfg, notes))
}

/// The settings of this invocation.
fn run_options(a: &TrainArgs, cfg: &TrainConfig, given: &GivenFlags) -> Result<RunOptions> {
    let run_dir = match (&a.run_dir, a.resume) {
        (Some(p), _) => p.clone(),
        (None, true) => {
            return Err(Error::invalid(
                "--resume needs --run-dir (the run to continue)",
            ));
        }
        (None, false) => default_run_dir(&cfg.model),
    };
    let mut opts = RunOptions::new(run_dir);
    opts.resume = a.resume;
    opts.kernel_options.ane_strict = a.ane_strict;
    if let Some(t) = a.threads {
        if t == 0 {
            return Err(Error::invalid("--threads must be at least 1"));
        }
        opts.threads = t;
    }
    opts.console = if a.quiet {
        ConsoleMode::Quiet
    } else if a.plain {
        ConsoleMode::Lines
    } else {
        ConsoleMode::auto()
    };
    opts.stop_after = a.stop_after;
    if !(a.bucket_mb.is_finite() && a.bucket_mb >= 0.001) {
        return Err(Error::invalid(format!(
            "--bucket-mb must be at least 0.001 (1 kB), got {}",
            a.bucket_mb
        )));
    }
    opts.comm = crate::train::CommOptions {
        overlap: !a.no_overlap,
        bucket_values: ((a.bucket_mb * 1e6 / 4.0) as usize).max(1),
    };
    if let Some(dir) = &a.tensorboard {
        opts.extra_sinks.push(Box::new(
            crate::telemetry::tensorboard::TensorBoardSink::for_run(dir, &opts.run_dir),
        ));
    }
    if a.wandb {
        use crate::telemetry::wandb::{WandbOptions, WandbSink, check_python};
        match check_python() {
            Err(why) => eprintln!("warning: W&B logging is off: {why}"),
            Ok(()) => {
                let name = a.wandb_name.clone().or_else(|| {
                    opts.run_dir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                });
                let w = WandbOptions {
                    project: a.wandb_project.clone(),
                    name,
                    mode: a.wandb_mode,
                    dir: opts.run_dir.clone(),
                };
                match WandbSink::start(&w) {
                    Ok(s) => opts.extra_sinks.push(Box::new(s)),
                    Err(e) => eprintln!("warning: W&B logging is off: {e}"),
                }
            }
        }
    }
    opts.cap_seq_to_model = !given.contains("seq") && a.config.is_none();
    if a.resume {
        opts.requested_model = given.contains("model").then(|| cfg.model.clone());
    }
    Ok(opts)
}

/// A flag raised by the first Ctrl-C (the trainer saves and stops); a second one exits.
fn ctrl_c_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let handler_flag = flag.clone();
    // Best effort: a second handler cannot be installed in the same process (tests).
    let _ = ctrlc::set_handler(move || {
        if handler_flag.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted again: exiting without saving");
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupt: finishing this update and saving a checkpoint (Ctrl-C again to quit at once)"
        );
    });
    flag
}

/// What to do next, after the run (the trainer has finished: plain lines are safe).
/// With `quiet`, a completed run says nothing (the sample was its output).
fn report(outcome: &crate::train::TrainOutcome, quiet: bool) -> Result<()> {
    let dir = outcome.run_dir.display().to_string();
    match outcome.reason {
        EndReason::Interrupted => {
            super::say(&format!(
                "saved {} at update {}; continue with:",
                crate::run::RunDir::new(&outcome.run_dir).latest().display(),
                outcome.step
            ));
            super::say(&format!("  handgrad train --resume --run-dir {dir}"));
            Err(Error::Interrupted)
        }
        EndReason::Stopped => {
            super::say(&format!(
                "stopped at update {}; continue with: handgrad train --resume --run-dir {dir}",
                outcome.step
            ));
            Ok(())
        }
        EndReason::Completed if quiet => Ok(()),
        EndReason::Completed => {
            if let Some(v) = outcome.best_val_loss {
                super::say(&format!("best validation loss {v:.4}"));
            }
            super::say(&format!("run saved in {dir}; generate more with:"));
            super::say(&format!(
                "  handgrad generate --run-dir {dir} --prompt \"Once upon a time\""
            ));
            Ok(())
        }
    }
}
