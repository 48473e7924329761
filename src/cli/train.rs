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

fn d() -> TrainConfig {
    TrainConfig::default()
}

/// Options of `handgrad train`. Defaults train the `small` preset on the built-in stories.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Model [default: small]: a preset (tiny, small, stories260k, stories15m, stories42m,
    /// stories110m, qwen3-0.6b) or a Hugging Face config.json. Presets take the tokenizer's
    /// vocabulary.
    #[arg(long)]
    model: Option<String>,
    /// Fine-tune: start from this model's weights (Hugging Face folder or .safetensors,
    /// llama2.c .bin, GGUF, or handgrad checkpoint); its tokenizer comes along when it has one.
    #[arg(long, conflicts_with = "model")]
    init_from: Option<String>,
    /// Training data [default: builtin]: `builtin` (generated children's stories with their own
    /// tokenizer), a token file (llama2.c uint16 or handgrad shard) or a folder of them.
    #[arg(long)]
    data: Option<String>,
    /// Tokenizer file (tokenizer.json or llama2.c tokenizer.bin); by default the model's (with
    /// --init-from) or the one next to the data.
    #[arg(long)]
    tokenizer: Option<String>,
    /// Optimizer updates in the whole run [default: 1000]; on --resume, a new total.
    #[arg(long)]
    steps: Option<usize>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = d().batch)]
    batch: usize,
    /// Tokens per sequence [default: 128, or the model's limit when smaller].
    #[arg(long)]
    seq: Option<usize>,
    /// Micro-batches accumulated per optimizer update.
    #[arg(long, default_value_t = d().accum)]
    accum: usize,
    /// Peak learning rate (after warmup).
    #[arg(long, default_value_t = d().lr)]
    lr: f64,
    /// Final learning rate of the cosine decay, as a fraction of --lr.
    #[arg(long, default_value_t = d().min_lr_ratio)]
    min_lr_ratio: f64,
    /// Updates of linear learning-rate warmup.
    #[arg(long, default_value_t = d().warmup)]
    warmup: usize,
    /// AdamW weight decay (matrices and embeddings; never norm gains).
    #[arg(long, default_value_t = d().weight_decay)]
    weight_decay: f64,
    /// AdamW beta1.
    #[arg(long, default_value_t = d().beta1)]
    beta1: f64,
    /// AdamW beta2.
    #[arg(long, default_value_t = d().beta2)]
    beta2: f64,
    /// Clip the global gradient norm to this value (0: no clipping).
    #[arg(long, default_value_t = d().clip)]
    clip: f64,
    /// Seed of initialisation, data order and the final sample.
    #[arg(long, default_value_t = d().seed)]
    seed: u64,
    /// Evaluate on the validation windows every N updates (0: only at the end).
    #[arg(long, default_value_t = d().eval_every)]
    eval_every: usize,
    /// Validation batches per evaluation.
    #[arg(long, default_value_t = d().eval_batches)]
    eval_batches: usize,
    /// Save checkpoints/latest every N updates (0: only at the end and on Ctrl-C).
    #[arg(long, default_value_t = d().save_every)]
    save_every: usize,
    /// Fraction of a single data file held out for validation.
    #[arg(long, default_value_t = d().val_fraction)]
    val_fraction: f64,
    /// Restrict the classifier to token ids that occur in the data (faster for small corpora;
    /// the reported loss is then over that compacted vocabulary, not the full one).
    #[arg(long)]
    vocab_compaction: bool,
    #[command(flatten)]
    backend: BackendArgs,
    /// Loss scaling: auto (dynamic on fp16 backends such as ane-sim, none on the CPU), none,
    /// static[:SCALE] (a fixed factor), or dynamic[:SCALE] (start at SCALE, default 256; an
    /// overflowing update is skipped and the scale halved; 200 clean updates double it).
    #[arg(long, default_value = "auto")]
    loss_scale: crate::train::LossScale,
    /// An update whose loss or gradient is not finite (NaN or infinite) is skipped, with a
    /// warning naming the first non-finite tensor; K such updates in a row stop the run (the
    /// last checkpoint is intact). With dynamic loss scaling the scale is lowered instead.
    #[arg(long, default_value_t = 3, value_name = "K")]
    max_bad_updates: usize,
    /// With --backend ane: stop with an error when a kernel cannot run on the Neural Engine
    /// (the device rejects it, or its first evaluation disagrees with the simulator), instead
    /// of running that kernel on the CPU with a warning.
    #[arg(long)]
    ane_strict: bool,
    /// With --backend ane: when the Neural Engine compiler's per-process budget
    /// (HANDGRAD_ANE_COMPILE_BUDGET, default 100 compiles) would be passed, stop with an error
    /// instead of restarting the process to continue from the last checkpoint.
    #[arg(long)]
    no_restart: bool,
    /// Run folder (default: runs/MODEL-N, the first free N).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue the run in --run-dir from its latest checkpoint, exactly where it stopped.
    #[arg(long)]
    resume: bool,
    /// Stop after N updates in this invocation (saving a checkpoint); the schedule still spans
    /// --steps, so a later --resume continues the same run.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Worker threads (default: physical cores, shared out among the ranks of an MPI job on
    /// this machine).
    #[arg(long)]
    threads: Option<usize>,
    /// Data-parallel training: auto (MPI when started by mpirun/mpiexec/srun), none, or mpi.
    /// Each rank trains on --batch sequences of every micro-batch; gradients are summed across
    /// ranks before one identical update everywhere; rank 0 writes the run.
    #[arg(long, value_enum, default_value_t = Distributed::Auto)]
    distributed: Distributed,
    /// Prompt of the sample generated at the end.
    #[arg(long, default_value_t = d().sample_prompt)]
    sample_prompt: String,
    /// Tokens of the sample generated at the end (0: none).
    #[arg(long, default_value_t = d().sample_tokens)]
    sample_tokens: usize,
    /// Print plain progress lines instead of a progress bar.
    #[arg(long)]
    plain: bool,
    /// Print only warnings, errors and the sample.
    #[arg(long, short)]
    quiet: bool,
    /// Show the run in the terminal dashboard (q saves and stops; see `handgrad dashboard`).
    #[arg(long, conflicts_with_all = ["plain", "quiet"])]
    dashboard: bool,
    /// With --dashboard: generate a sample from the latest checkpoint every N updates.
    #[arg(long, default_value_t = 200)]
    sample_every: u64,
    /// With --dashboard: the machine's peak GFLOP/s (from `handgrad bench matmul`), to show MFU.
    #[arg(long)]
    peak_gflops: Option<f64>,
    /// Write TensorBoard event files into this folder (`tensorboard --logdir DIR`).
    #[arg(long)]
    tensorboard: Option<PathBuf>,
    /// Log to Weights & Biases (through a Python sidecar using the `wandb` package).
    #[arg(long)]
    wandb: bool,
    /// W&B project.
    #[arg(long, default_value = "handgrad")]
    wandb_project: String,
    /// W&B run name [default: the run folder's name].
    #[arg(long)]
    wandb_name: Option<String>,
    /// W&B mode: online, or offline (written locally; `wandb sync` uploads it).
    #[arg(long, value_enum, default_value_t = crate::telemetry::wandb::WandbMode::Online)]
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
    let (cfg, notes) = train_config(&a, &given);
    let mut opts = run_options(&a, &cfg)?;
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

/// The training configuration the flags ask for, and notes on what was adjusted.
fn train_config(a: &TrainArgs, given: &GivenFlags) -> (TrainConfig, Vec<String>) {
    let backend = a.backend.resolve();
    let mut cfg = TrainConfig {
        model: a
            .model
            .clone()
            .or_else(|| a.init_from.clone())
            .unwrap_or_else(|| d().model),
        init_from: a.init_from.clone(),
        data: a.data.clone().unwrap_or_else(|| d().data),
        tokenizer: a.tokenizer.clone(),
        steps: a.steps.unwrap_or(d().steps),
        batch: a.batch,
        seq: a.seq.unwrap_or(d().seq),
        accum: a.accum,
        lr: a.lr,
        min_lr_ratio: a.min_lr_ratio,
        warmup: a.warmup,
        weight_decay: a.weight_decay,
        beta1: a.beta1,
        beta2: a.beta2,
        clip: a.clip,
        seed: a.seed,
        eval_every: a.eval_every,
        eval_batches: a.eval_batches,
        save_every: a.save_every,
        vocab_compaction: a.vocab_compaction,
        backend: backend.kind,
        precision: backend.precision,
        loss_scale: a.loss_scale,
        max_bad_updates: a.max_bad_updates,
        val_fraction: a.val_fraction,
        sample_prompt: a.sample_prompt.clone(),
        sample_tokens: a.sample_tokens,
        ..d()
    };
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
    (cfg, notes)
}

/// The settings of this invocation.
fn run_options(a: &TrainArgs, cfg: &TrainConfig) -> Result<RunOptions> {
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
    opts.cap_seq_to_model = a.seq.is_none();
    if a.resume {
        opts.requested_model = a.model.clone();
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
