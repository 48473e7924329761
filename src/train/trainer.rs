//! The training loop: resolve the run (`setup`), prepare the kernels and the run folder, then
//! one [`TrainStep`] per update with evaluation, crash-safe checkpoints, events and a final
//! sample.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::config::TrainConfig;
use super::distributed::{Collective, Single, rescale_accum};
use super::loss_scale::{LossScaler, Verdict};
use super::run_dir::{self, RunPaths};
use super::run_lock::RunLock;
use super::setup::{self, GivenFlags, ResumePoint};
use super::step::{StepState, TrainStep};
use crate::backend::Kernels;
use crate::data::{Dataset, WindowSampler, builtin};
use crate::error::{Error, Result};
use crate::formats::LoadedModel;
use crate::formats::checkpoint::{CheckpointMeta, CheckpointRef, FORMAT_VERSION};
use crate::generate::{GenerateOptions, Sampling, WeightFormat, generate};
use crate::model::{Activations, Batch, ModelConfig, Transformer};
use crate::optim::{AdamW, AdamWConfig, CosineSchedule};
use crate::telemetry::events::{DataSummary, ParamSummary, unix_now};
use crate::telemetry::power::PowerMeter;
use crate::telemetry::{
    CheckpointKind, ConsoleMode, ConsoleSink, EndReason, Event, EventBus, EventSink, JsonlSink,
    LossKind,
};
use crate::tokenizer::Tokenizer;
use crate::util::fsutil::remove_stale_temp_files;

/// Step events carry the process's resident memory every this many updates (and the first).
const RSS_EVERY: u64 = 10;

/// Settings of one invocation that do not change what is computed.
pub struct RunOptions {
    /// The run directory (`runs/NAME`).
    pub run_dir: PathBuf,
    /// Continue the run in `run_dir` from `checkpoints/latest`.
    pub resume: bool,
    /// Worker threads.
    pub threads: usize,
    /// How progress is shown.
    pub console: ConsoleMode,
    /// Stop (and save) after this many updates in this invocation.
    pub stop_after: Option<usize>,
    /// Set from outside (Ctrl-C) to save and stop after the current update.
    pub stop_flag: Option<Arc<AtomicBool>>,
    /// Extra event sinks (dashboards, loggers, tests).
    pub extra_sinks: Vec<Box<dyn EventSink>>,
    /// Where the built-in dataset is cached.
    pub cache_root: PathBuf,
    /// On resume: the model the user asked for, to refuse a checkpoint of another model.
    pub requested_model: Option<String>,
    /// Options of the kernels that do not change the numbers (`--ane-strict`).
    pub kernel_options: crate::backend::KernelOptions,
    /// Notes from the caller for the run header (e.g. a default it adjusted).
    pub notes: Vec<String>,
    /// The settings the command line gave (a resumed run applies or refuses those that differ
    /// from its saved ones; the rest are defaults and change nothing).
    pub given: GivenFlags,
    /// When the model has fewer positions than `seq`, train on the model's limit (with a note)
    /// instead of failing: set when `seq` is a default rather than the user's choice.
    pub cap_seq_to_model: bool,
    /// The caller restarts the process when the Neural Engine compile budget is spent (so a
    /// `restart` event is logged); otherwise that is an error.
    pub restart_on_compile_budget: bool,
    /// The data-parallel job this process is one rank of (`None`: a single process). Rank 0
    /// owns the run folder (lock, checkpoints, events, evaluation, the sample); the others
    /// only train and say nothing but errors.
    pub ranks: Option<Arc<dyn Collective>>,
}

impl RunOptions {
    /// Defaults for a run directory.
    pub fn new(run_dir: impl Into<PathBuf>) -> Self {
        RunOptions {
            run_dir: run_dir.into(),
            resume: false,
            threads: default_threads(),
            console: ConsoleMode::auto(),
            stop_after: None,
            stop_flag: None,
            extra_sinks: Vec::new(),
            cache_root: builtin::cache_root(),
            requested_model: None,
            kernel_options: Default::default(),
            notes: Vec::new(),
            given: GivenFlags::default(),
            cap_seq_to_model: false,
            restart_on_compile_budget: false,
            ranks: None,
        }
    }
}

/// Physical cores (hyper-threads share FMA units and slow dense math down).
pub fn default_threads() -> usize {
    num_cpus::get_physical().max(1)
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub run_dir: PathBuf,
    /// Updates completed in total (all sessions).
    pub step: u64,
    pub reason: EndReason,
    /// Training loss of each update of this session.
    pub losses: Vec<f64>,
    pub final_val_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub sample: Option<String>,
}

/// Runs (or resumes) a training run.
pub fn train(cfg: TrainConfig, opts: RunOptions) -> Result<TrainOutcome> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.max(1))
        .build()
        .map_err(|e| {
            Error::invalid(format!("cannot start {} worker threads: {e}", opts.threads))
        })?;
    pool.install(|| Trainer::start(cfg, opts)?.run())
}

/// Progress counters (saved in checkpoints).
#[derive(Debug, Default)]
struct Counters {
    step: u64,
    tokens_seen: u64,
    best_val_loss: Option<f64>,
    last_val_loss: Option<f64>,
    last_train_loss: Option<f64>,
    train_seconds: f64,
    resumed_from: Option<u64>,
}

/// What this invocation measured.
#[derive(Default)]
struct Session {
    first_step: u64,
    losses: Vec<f64>,
    update_ms: Vec<f64>,
}

/// A run in progress.
struct Trainer {
    cfg: TrainConfig,
    paths: RunPaths,
    stop_after: Option<usize>,
    stop_flag: Option<Arc<AtomicBool>>,
    model: Transformer,
    kernels: Box<dyn Kernels>,
    tokenizer: Option<Box<dyn Tokenizer>>,
    data: Dataset,
    data_source: String,
    sampler: WindowSampler,
    state: StepState,
    scaler: LossScaler,
    /// Power readings, where the machine offers them.
    power: Option<PowerMeter>,
    schedule: CosineSchedule,
    counters: Counters,
    bus: EventBus,
    val_windows: Vec<Vec<u32>>,
    /// Said once the run starts: warnings, and notes for the run header.
    warnings: Vec<String>,
    notes: Vec<String>,
    /// One `seq + 1` window of tokens.
    window: Vec<u32>,
    /// This trainer owns the run folder while it runs (rank 0 of a distributed job only).
    _lock: Option<RunLock>,
    /// The ranks of a data-parallel job ([`Single`] alone).
    ranks: Arc<dyn Collective>,
}

impl Trainer {
    /// Resolves and validates everything, prepares the kernels, then (and only then) writes
    /// the run folder.
    fn start(cfg: TrainConfig, mut opts: RunOptions) -> Result<Self> {
        let paths = RunPaths {
            dir: opts.run_dir.clone(),
        };
        let ranks: Arc<dyn Collective> = opts.ranks.clone().unwrap_or_else(|| Arc::new(Single));
        let leader = ranks.rank() == 0;
        let console = if leader {
            opts.console
        } else {
            ConsoleMode::Off
        };
        let mut sinks: Vec<Box<dyn EventSink>> = vec![Box::new(ConsoleSink::new(console))];
        if leader {
            sinks.append(&mut opts.extra_sinks);
        }
        let mut bus = EventBus::new(sinks);
        let (mut warnings, mut notes) = (Vec::new(), std::mem::take(&mut opts.notes));
        let cores = num_cpus::get();
        if opts.threads > cores {
            warnings.push(format!(
                "{} threads on a machine with {cores} logical cores: the threads take turns and dense math slows down (the default is the physical cores, {})",
                opts.threads,
                default_threads()
            ));
        }

        // 0. The run folder is this trainer's from here on (a second one is refused); what a
        // killed predecessor left half-written goes. Only rank 0 writes in it.
        // A lone trainer killed while starting leaves its lock and nothing else: `--resume`
        // starts that run afresh (decided before this trainer takes the lock; MPI ranks do not
        // share what they see of the folder, so they keep the error).
        let killed_while_starting = ranks.size() == 1 && run_dir::holds_only_a_lock(&paths.dir);
        let lock = if leader {
            let lock = RunLock::acquire(&paths.dir, &mut warnings)?;
            let stale =
                remove_stale_temp_files(&paths.checkpoints()) + remove_stale_temp_files(&paths.dir);
            if stale > 0 {
                warnings.push(format!(
                    "removed {stale} unfinished temporary file(s) left by an interrupted write"
                ));
            }
            Some(lock)
        } else {
            None
        };

        // 1. The configuration: the user's, or the checkpoint's on resume.
        let (mut cfg, resume) = if opts.resume && !paths.has_checkpoint() {
            // Killed before its first checkpoint: the run starts again from its saved settings,
            // or, killed before it saved them, from this command's.
            match setup::restart_config(&paths, &cfg, &opts.given, &mut warnings)? {
                Some(c) => {
                    warnings.push(format!(
                        "{} has no checkpoint yet: the run starts again from update 0 with its saved settings",
                        paths.dir.display()
                    ));
                    (c, None)
                }
                None if killed_while_starting => {
                    warnings.push(format!(
                        "{} holds no saved run yet (it was stopped while starting): starting it afresh with this command's settings",
                        paths.dir.display()
                    ));
                    (cfg, None)
                }
                None => return Err(setup::nothing_to_resume(&paths)),
            }
        } else if opts.resume {
            let (c, r) = setup::resume_config(&paths, &cfg, &opts.given, &mut warnings)?;
            (c, Some(r))
        } else {
            (cfg, None)
        };
        cfg.validate()?;
        let size = ranks.size();
        if resume.is_some() && cfg.ranks.max(1) != size {
            let accum = rescale_accum(cfg.batch, cfg.accum, cfg.ranks.max(1), size)?;
            warnings.push(format!(
                "the run was trained on {} rank(s) and continues on {size}: --accum {} -> {accum} keeps {} sequences per update",
                cfg.ranks.max(1),
                cfg.accum,
                cfg.batch * cfg.accum * cfg.ranks.max(1)
            ));
            cfg.accum = accum;
        }
        cfg.ranks = size;
        if size > 1 {
            notes.push(format!(
                "data parallel: {}; rank 0 of {size} writes the run; {} sequences per update ({} per rank)",
                ranks.describe(),
                cfg.batch * cfg.accum * size,
                cfg.batch * cfg.accum
            ));
        }
        let backend = cfg.backend();
        warnings.extend(backend.warnings());
        // Fail fast on a bad model name or config before any data work.
        if cfg.init_from.is_none() {
            ModelConfig::from_preset_or_path(&cfg.model)?;
        }
        if let Some(spec) = &opts.requested_model {
            ModelConfig::from_preset_or_path(spec)?;
        }

        // 2. Weights to start from, data and tokenizer.
        let init = setup::load_init(&cfg, resume.as_ref())?;
        let model_tok = setup::weights_tokenizer(&cfg, resume.as_ref(), init.as_ref())?;
        let mut log = |m: &str| bus.emit(Event::Info { message: m.into() });
        let data = setup::data(&cfg, &opts.cache_root, model_tok, &mut log)?;
        let tok = data.tokenizer.as_deref();

        // 3. The model.
        let model_cfg = match (&resume, &init) {
            (Some(r), _) => setup::model_of_checkpoint(r, opts.requested_model.as_deref(), tok)?,
            (None, Some(m)) => {
                let origin = cfg.init_from.as_deref().unwrap_or("");
                setup::model_of_init(m, origin, tok, &mut warnings)?
            }
            (None, None) => setup::model_from_spec(&cfg.model, tok)?,
        };
        let cap = opts.cap_seq_to_model && resume.is_none();
        cfg.seq = setup::sequence_length(&cfg, &model_cfg, cap, &mut notes)?;
        data.data.validate(model_cfg.vocab_size, cfg.seq)?;
        if data.data.val.is_empty() && (cfg.eval_every > 0 || cfg.eval_batches > 0) {
            warnings.push("no validation data: evaluation is skipped".into());
        }
        let mut model = Transformer::new(model_cfg);
        let compaction = setup::compaction(&cfg, &model, &data.data, resume.as_ref());
        model.set_compaction(compaction);

        // 4. The memory the run needs, against what the machine has; then the kernels,
        // prepared once for this shape: a backend fails here, not mid-run.
        let mut kernels = backend.kernels_with(opts.kernel_options)?;
        super::memory::MemoryNeed::of(&model, kernels.as_ref(), cfg.batch, cfg.seq)
            .check(crate::util::mem::available_bytes())?;
        if let Err(e) = kernels.prepare(&model.step_shape(cfg.batch, cfg.seq)) {
            if let Error::AneCompileBudget {
                used,
                limit,
                needed,
            } = &e
                && opts.restart_on_compile_budget
                && needed <= limit
            {
                // Said in the run's log (when it has one) before the CLI restarts the process.
                if paths.events().exists()
                    && let Ok(log) = JsonlSink::open(&paths.events())
                {
                    bus.attach_log(Box::new(log));
                }
                bus.emit(Event::Restart {
                    step: resume.as_ref().map_or(0, |r| r.checkpoint.meta.step),
                    reason: e.to_string(),
                    compiles_used: *used,
                    compile_budget: *limit,
                });
                bus.finish();
            }
            return Err(e);
        }
        warnings.extend(kernels.warnings());

        // 5. Parameters, optimizer and data position.
        let saved_scale = resume.as_ref().and_then(|r| r.checkpoint.meta.loss_scale);
        let scaler = LossScaler::new(
            cfg.loss_scale.resolve(cfg.backend),
            saved_scale,
            cfg.max_bad_updates,
        );
        let (state, sampler, counters) = initial_state(&cfg, &model, &data.data, resume, init)?;

        // 6. The run folder, then its event log (which receives everything said so far).
        if leader {
            run_dir::prepare(
                &paths,
                opts.resume && !killed_while_starting,
                &cfg,
                &model.cfg,
                data.tokenizer.as_deref(),
            )?;
            bus.attach_log(Box::new(JsonlSink::open(&paths.events())?));
        }

        Ok(Trainer {
            schedule: CosineSchedule {
                lr: cfg.lr,
                min_lr_ratio: cfg.min_lr_ratio,
                warmup: cfg.warmup,
                total: cfg.steps,
            },
            val_windows: data.data.val_windows(cfg.eval_batches * cfg.batch, cfg.seq),
            window: vec![0; cfg.seq + 1],
            stop_after: opts.stop_after,
            stop_flag: opts.stop_flag,
            tokenizer: data.tokenizer,
            data_source: data.source,
            data: data.data,
            sampler,
            state,
            scaler,
            power: PowerMeter::open(),
            counters,
            bus,
            warnings,
            notes,
            kernels,
            model,
            paths,
            cfg,
            _lock: lock,
            ranks,
        })
    }

    /// Whether this process writes the run (rank 0, or the only process).
    fn leader(&self) -> bool {
        self.ranks.rank() == 0
    }

    /// Whether any rank says yes (every rank gets the same answer).
    fn any_rank(&self, yes: bool) -> Result<bool> {
        if self.ranks.size() == 1 {
            return Ok(yes);
        }
        let mut v = [f64::from(u8::from(yes))];
        self.ranks.sum_f64(&mut v)?;
        Ok(v[0] > 0.0)
    }

    fn loss_kind(&self) -> LossKind {
        if self.model.compaction.is_some() {
            LossKind::Compacted
        } else {
            LossKind::Full
        }
    }

    fn tokenizer_id(&self) -> String {
        self.tokenizer
            .as_ref()
            .map(|t| t.id().to_string())
            .unwrap_or_else(|| "none".into())
    }

    /// Runs the loop; an error is told to the sinks (`run_error`) before it is returned.
    fn run(mut self) -> Result<TrainOutcome> {
        match self.run_loop() {
            Ok(o) => Ok(o),
            Err(e) => {
                let message = e.to_string();
                self.bus.emit(Event::RunError {
                    step: self.counters.step,
                    message,
                });
                self.bus.finish();
                Err(e)
            }
        }
    }

    fn run_loop(&mut self) -> Result<TrainOutcome> {
        let wall = Instant::now();
        for message in std::mem::take(&mut self.warnings) {
            self.bus.emit(Event::Warning { message });
        }
        let mut acts = self
            .model
            .activations(self.kernels.as_ref(), self.cfg.batch, self.cfg.seq);
        self.emit_run_start(&acts)?;
        let mut session = Session {
            first_step: self.counters.step,
            ..Default::default()
        };
        let mut reason = EndReason::Completed;
        while self.counters.step < self.cfg.steps as u64 {
            self.update(&mut acts, &mut session)?;
            if let Some(r) = self.after_update(&mut acts, &session)? {
                reason = r;
                break;
            }
        }
        let mut sample = None;
        if reason == EndReason::Completed && self.leader() {
            if !self.val_windows.is_empty() {
                self.evaluate(&mut acts)?;
            }
            self.save_latest(CheckpointKind::Final)?;
            sample = self.sample()?;
        }
        self.emit_run_end(reason, wall.elapsed().as_secs_f64(), &session);
        self.bus.finish();
        Ok(TrainOutcome {
            run_dir: self.paths.dir.clone(),
            step: self.counters.step,
            reason,
            losses: std::mem::take(&mut session.losses),
            final_val_loss: self.counters.last_val_loss,
            best_val_loss: self.counters.best_val_loss,
            sample,
        })
    }

    fn emit_run_start(&mut self, acts: &Activations) -> Result<()> {
        let (cfg, model) = (&self.cfg, &self.model);
        let counts = model.cfg.param_counts();
        let event = Event::RunStart {
            run_dir: self.paths.dir.display().to_string(),
            model: model.cfg.to_hf_json(),
            train: serde_json::to_value(cfg)
                .map_err(|e| Error::json("encoding the training config", e))?,
            params: ParamSummary {
                total: counts.total,
                embedding: counts.embedding,
                non_embedding: counts.non_embedding,
            },
            data: DataSummary {
                source: self.data_source.clone(),
                train_tokens: self.data.train_tokens(),
                val_tokens: self.data.val_tokens(),
                split: self.data.split.clone(),
            },
            tokenizer: self.tokenizer_id(),
            backend: {
                let mut info = cfg.backend().info();
                info.kernels = self.kernels.placement();
                info
            },
            tokens_per_update: cfg.tokens_per_update(),
            flops_per_update: model.cfg.train_flops(cfg.batch, cfg.seq)
                * (cfg.accum * cfg.ranks.max(1)) as f64,
            activation_bytes: acts.bytes(),
            threads: rayon::current_num_threads(),
            vocab_compacted_to: model.compaction.as_ref().map(|c| c.len()),
            resumed_from_step: self.counters.resumed_from,
            notes: self.notes.clone(),
            power_source: self.power.as_ref().map(|p| p.source().to_string()),
        };
        self.bus.emit(event);
        Ok(())
    }

    /// One optimizer update, and its `step` event.
    fn update(&mut self, acts: &mut Activations, session: &mut Session) -> Result<()> {
        let t0 = Instant::now();
        let cpu0 = crate::util::mem::cpu_seconds();
        if let Some(p) = &mut self.power {
            p.joules_since_last();
        }
        acts.timings.reset();
        let (b, t_len) = (self.cfg.batch, self.cfg.seq);
        let lr = self.schedule.lr_at(self.counters.step as usize);
        let step = TrainStep {
            model: &self.model,
            kernels: self.kernels.as_ref(),
            accum: self.cfg.accum,
            clip: self.cfg.clip,
            loss_scale: self.scaler.scale() as f32,
            ranks: Some(self.ranks.as_ref()),
        };
        let reported_scale = self.scaler.reported();
        let (sampler, data, window) = (&mut self.sampler, &self.data, &mut self.window);
        let (rank, size) = (self.ranks.rank(), self.ranks.size());
        // A micro-batch of the whole job is `b x size` windows of one stream; this rank
        // trains on its `b` of them and skips the others' (see `distributed`).
        let mut next_batch = |inputs: &mut [u32], targets: &mut [u32]| {
            for g in 0..b * size {
                if g / b != rank {
                    sampler.skip_window();
                    continue;
                }
                let s = g % b;
                sampler.next_window(data, window);
                inputs[s * t_len..(s + 1) * t_len].copy_from_slice(&window[..t_len]);
                targets[s * t_len..(s + 1) * t_len].copy_from_slice(&window[1..]);
            }
        };
        let stats = step.run(&mut self.state, acts, &mut next_batch, lr)?;
        let mut detail = format!("loss {}, gradient norm {}", stats.loss, stats.grad_norm);
        if !stats.applied {
            let layout = &self.model.layout;
            if let Some((name, n)) = layout.first_non_finite(&self.state.params) {
                detail.push_str(&format!(
                    "; weights non-finite first in {name} ({n} values)"
                ));
            } else if let Some((name, n)) = layout.first_non_finite(&self.state.grads) {
                detail.push_str(&format!("; first non-finite gradient: {name} ({n} values)"));
            }
        }
        let verdict = self
            .scaler
            .update(stats.applied, self.counters.step + 1, &detail)?;
        // Dynamic scaling's overflows are routine (the step event says `skipped`); any other
        // skipped update is worth a warning.
        if verdict == Verdict::Skipped && !self.scaler.is_dynamic() {
            self.bus.emit(Event::Warning {
                message: format!(
                    "update {} skipped: {detail}; {} such updates in a row stop the run",
                    self.counters.step + 1,
                    self.cfg.max_bad_updates.max(1)
                ),
            });
        }
        let tokens = self.cfg.tokens_per_update();
        let wall = t0.elapsed().as_secs_f64();
        let cpu_percent = match (cpu0, crate::util::mem::cpu_seconds()) {
            // /proc counts in 10 ms ticks: shorter updates give no meaningful figure.
            (Some(a), Some(b)) if wall >= 0.1 => Some(100.0 * (b - a) / wall),
            _ => None,
        };
        let energy_j = self.power.as_mut().and_then(|p| p.joules_since_last());
        let loss_kind = self.loss_kind();
        let c = &mut self.counters;
        c.step += 1;
        c.tokens_seen += tokens as u64;
        let secs = t0.elapsed().as_secs_f64();
        c.train_seconds += secs;
        if verdict == Verdict::Applied {
            c.last_train_loss = Some(stats.loss);
        }
        session.update_ms.push(secs * 1e3);
        session.losses.push(stats.loss);
        let rss = (c.step == session.first_step + 1 || c.step.is_multiple_of(RSS_EVERY))
            .then(crate::util::mem::rss_bytes)
            .flatten();
        let event = Event::Step {
            step: c.step,
            total_steps: self.cfg.steps as u64,
            loss: stats.loss,
            loss_kind,
            lr,
            grad_norm: stats.grad_norm,
            clipped: stats.clipped,
            ms: secs * 1e3,
            tokens_per_s: tokens as f64 / secs,
            tokens_seen: c.tokens_seen,
            kernels: acts.timings.kernel_ms(),
            accelerator: stats
                .accelerator
                .map(|a| crate::telemetry::AcceleratorStep {
                    kernel_ms: a.kernel_ms,
                    staging_ms: a.staging_ms,
                    cpu_ms: (secs * 1e3 - a.kernel_ms - a.staging_ms).max(0.0),
                    bytes_staged: a.bytes_staged,
                    weight_bytes_staged: a.weight_bytes_staged,
                    calls: a.calls,
                }),
            rss_bytes: rss,
            loss_scale: reported_scale,
            skipped: verdict == Verdict::Skipped,
            cpu_percent,
            energy_j,
            energy_j_per_token: energy_j.map(|e| e / tokens as f64),
            power_w: energy_j.map(|e| e / wall.max(1e-9)),
        };
        self.bus.emit(event);
        Ok(())
    }

    /// Evaluation and checkpoints due after an update; `Some` when this invocation stops.
    fn after_update(
        &mut self,
        acts: &mut Activations,
        session: &Session,
    ) -> Result<Option<EndReason>> {
        let step = self.counters.step;
        let last = step == self.cfg.steps as u64;
        let every = |n: usize| n > 0 && step.is_multiple_of(n as u64) && !last;
        if every(self.cfg.eval_every) && self.leader() {
            self.evaluate(acts)?;
        }
        let interrupted = self.any_rank(
            self.stop_flag
                .as_ref()
                .is_some_and(|f| f.load(Ordering::SeqCst)),
        )?;
        if interrupted {
            self.save_latest(CheckpointKind::Interrupt)?;
            return Ok(Some(EndReason::Interrupted));
        }
        if self
            .stop_after
            .is_some_and(|n| step - session.first_step >= n as u64)
        {
            self.save_latest(CheckpointKind::Latest)?;
            return Ok(Some(EndReason::Stopped));
        }
        if every(self.cfg.save_every) {
            self.save_latest(CheckpointKind::Latest)?;
        }
        Ok(None)
    }

    fn emit_run_end(&mut self, reason: EndReason, wall_s: f64, session: &Session) {
        let ms = &session.update_ms;
        let mut sorted = ms.clone();
        sorted.sort_by(f64::total_cmp);
        let mean_ms = ms.iter().sum::<f64>() / ms.len().max(1) as f64;
        let per_s = |work: f64| {
            if mean_ms > 0.0 {
                work / (mean_ms / 1e3)
            } else {
                0.0
            }
        };
        let flops = self.model.cfg.train_flops(self.cfg.batch, self.cfg.seq)
            * (self.cfg.accum * self.cfg.ranks.max(1)) as f64;
        let event = Event::RunEnd {
            step: self.counters.step,
            reason,
            wall_s,
            updates: ms.len() as u64,
            mean_ms_per_update: mean_ms,
            median_ms_per_update: sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
            tokens_per_s: per_s(self.cfg.tokens_per_update() as f64),
            gflops_per_s: per_s(flops) / 1e9,
            final_loss: self.counters.last_train_loss,
            best_val_loss: self.counters.best_val_loss,
            peak_rss_bytes: crate::util::mem::peak_rss_bytes(),
        };
        self.bus.emit(event);
    }

    /// Mean loss over the fixed validation windows; saves `best` on improvement.
    fn evaluate(&mut self, acts: &mut Activations) -> Result<f64> {
        let t0 = Instant::now();
        let (b, t_len) = (self.cfg.batch, self.cfg.seq);
        let mut inputs = vec![0u32; b * t_len];
        let mut targets = vec![0u32; b * t_len];
        let mut sum = 0.0;
        let mut batches = 0;
        for chunk in self.val_windows.chunks(b) {
            if chunk.len() < b {
                break;
            }
            for (s, w) in chunk.iter().enumerate() {
                inputs[s * t_len..(s + 1) * t_len].copy_from_slice(&w[..t_len]);
                targets[s * t_len..(s + 1) * t_len].copy_from_slice(&w[1..]);
            }
            let batch = Batch {
                inputs: &inputs,
                targets: &targets,
            };
            sum += self
                .model
                .loss(self.kernels.as_ref(), &self.state.params, acts, batch)?;
            batches += 1;
        }
        if batches == 0 {
            return Ok(f64::NAN);
        }
        let val = sum / batches as f64;
        let loss_kind = self.loss_kind();
        let c = &mut self.counters;
        c.last_val_loss = Some(val);
        let improved = val.is_finite() && c.best_val_loss.is_none_or(|b| val < b);
        if improved {
            c.best_val_loss = Some(val);
        }
        let event = Event::Eval {
            step: c.step,
            val_loss: val,
            loss_kind,
            best_val_loss: c.best_val_loss.unwrap_or(val),
            ms: t0.elapsed().as_secs_f64() * 1e3,
        };
        self.bus.emit(event);
        if improved {
            self.save(&self.paths.best(), false, CheckpointKind::Best)?;
        }
        Ok(val)
    }

    fn checkpoint_meta(&self) -> Result<CheckpointMeta> {
        let c = &self.counters;
        Ok(CheckpointMeta {
            format_version: FORMAT_VERSION,
            model_config: self.model.cfg.to_hf_json(),
            train_config: serde_json::to_value(&self.cfg)
                .map_err(|e| Error::json("encoding the training config", e))?,
            tokenizer_id: self.tokenizer_id(),
            tokenizer_file: self.tokenizer.as_ref().map(|t| t.file_name().to_string()),
            tokenizer_bytes: 0,
            n_params: self.state.params.len(),
            step: c.step,
            adam_t: self.state.opt.t,
            schedule_total: self.cfg.steps as u64,
            sampler: self.sampler.state(),
            tokens_seen: c.tokens_seen,
            best_val_loss: c.best_val_loss,
            last_val_loss: c.last_val_loss,
            last_train_loss: c.last_train_loss,
            vocab_kept: self.model.compaction.as_ref().map(|c| c.kept.clone()),
            train_seconds: c.train_seconds,
            written_unix: unix_now(),
            loss_scale: self.scaler.state(),
        })
    }

    /// Writes a checkpoint straight from the live buffers (no copy of the weights or moments).
    fn save(&mut self, path: &Path, with_moments: bool, kind: CheckpointKind) -> Result<()> {
        let previous = (kind != CheckpointKind::Best).then(|| self.paths.latest_prev());
        self.save_keeping(path, previous.as_deref(), with_moments, kind)
    }

    /// Writes a checkpoint, keeping the one it replaces as `previous`. Weights that are not
    /// finite are never saved: the last good checkpoint stays what `--resume` loads.
    fn save_keeping(
        &mut self,
        path: &Path,
        previous: Option<&Path>,
        with_moments: bool,
        kind: CheckpointKind,
    ) -> Result<()> {
        if let Some((name, n)) = self.model.layout.first_non_finite(&self.state.params) {
            return Err(Error::invalid(format!(
                "refusing to save {}: the weights hold {n} non-finite values in {name} (and maybe elsewhere); the last checkpoint is intact",
                path.display()
            )));
        }
        let t0 = Instant::now();
        let meta = self.checkpoint_meta()?;
        let opt = &self.state.opt;
        let bytes = CheckpointRef {
            meta: &meta,
            tokenizer: self
                .tokenizer
                .as_ref()
                .map(|t| t.file_bytes())
                .unwrap_or_default(),
            params: &self.state.params,
            moments: with_moments.then_some((opt.m.as_slice(), opt.v.as_slice())),
        }
        .save_keeping(path, previous)?;
        let event = Event::Checkpoint {
            step: self.counters.step,
            kind,
            path: path.display().to_string(),
            bytes,
            ms: t0.elapsed().as_secs_f64() * 1e3,
        };
        self.bus.emit(event);
        Ok(())
    }

    /// Writes `checkpoints/latest`, keeping the previous one as `latest.prev` (rank 0 only).
    fn save_latest(&mut self, kind: CheckpointKind) -> Result<()> {
        if !self.leader() {
            return Ok(());
        }
        let latest = self.paths.latest();
        self.save(&latest, true, kind)
    }

    /// The sample at the end of a run (an event; the console prints it).
    fn sample(&mut self) -> Result<Option<String>> {
        if self.cfg.sample_tokens == 0 {
            return Ok(None);
        }
        let Some(tok) = self.tokenizer.as_deref() else {
            let message = "no tokenizer: skipping the sample".into();
            self.bus.emit(Event::Warning { message });
            return Ok(None);
        };
        let opts = GenerateOptions {
            prompt: self.cfg.sample_prompt.clone(),
            max_tokens: self.cfg.sample_tokens,
            sampling: Sampling::TopK {
                k: 50,
                temperature: 0.8,
            },
            seed: self.cfg.seed,
            add_bos: true,
            weights: WeightFormat::Fp32,
        };
        let g = generate(
            &self.model,
            &self.state.params,
            self.kernels.as_ref(),
            tok,
            &opts,
            &mut |_| std::ops::ControlFlow::Continue(()),
        )?;
        let text = format!("{}{}", opts.prompt, g.text);
        let event = Event::Sample {
            step: self.counters.step,
            prompt: opts.prompt.clone(),
            text: text.clone(),
        };
        self.bus.emit(event);
        Ok(Some(text))
    }
}

/// Parameters, optimizer state, data position and counters: restored from the checkpoint on
/// resume, else fresh (from `--init-from` weights or a seeded initialisation).
fn initial_state(
    cfg: &TrainConfig,
    model: &Transformer,
    data: &Dataset,
    resume: Option<ResumePoint>,
    init: Option<LoadedModel>,
) -> Result<(StepState, WindowSampler, Counters)> {
    let adam = AdamWConfig {
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.adam_eps,
        weight_decay: cfg.weight_decay,
    };
    let mut opt = AdamW::new(adam, &model.layout);
    let mut sampler = WindowSampler::new(data, cfg.seq, cfg.seed);
    let tokens = cfg.batch * cfg.seq;
    let Some(ResumePoint {
        checkpoint: ck,
        path,
    }) = resume
    else {
        let params = match init {
            Some(m) => m.params,
            None => model.layout.init(model.cfg.n_layers, cfg.seed),
        };
        return Ok((
            StepState::new(params, opt, tokens),
            sampler,
            Counters::default(),
        ));
    };
    if ck.params.len() != model.layout.total() {
        return Err(Error::checkpoint(
            &path,
            "parameter count does not match its model config",
        ));
    }
    let Some((m, v)) = ck.moments else {
        return Err(Error::checkpoint(
            &path,
            "holds weights only (no optimizer state); cannot resume",
        ));
    };
    opt.m = m;
    opt.v = v;
    opt.t = ck.meta.adam_t;
    sampler.restore(&ck.meta.sampler);
    let meta = &ck.meta;
    let counters = Counters {
        step: meta.step,
        tokens_seen: meta.tokens_seen,
        best_val_loss: meta.best_val_loss,
        last_val_loss: meta.last_val_loss,
        last_train_loss: meta.last_train_loss,
        train_seconds: meta.train_seconds,
        resumed_from: Some(meta.step),
    };
    Ok((StepState::new(ck.params, opt, tokens), sampler, counters))
}
