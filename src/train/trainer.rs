//! The training loop: resolve the run (`resolve`), prepare the kernels and the run folder,
//! then one [`TrainStep`] per update with evaluation, crash-safe checkpoints
//! (`trainer/checkpoints.rs`), resource readings (`trainer/meter.rs`), events and a final
//! sample (`trainer/sample.rs`).

mod checkpoints;
mod meter;
mod sample;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use self::checkpoints::initial_state;
use self::meter::{Meter, Readings};
use super::batches::{Row, TrainData};
use super::compile_budget;
use super::diloco::OuterState;
use super::distributed::{Collective, Single};
use super::grad_sync::{Buckets, GradSync};
use super::loss_scale::{LossScaler, Verdict};
use super::options::{CommOptions, RunOptions, default_threads};
use super::resolve::{ResolvedRun, resolve};
use super::resume::ResumePoint;
use super::run_folder;
use super::step::{FrozenBase, StepComm, StepState, StepStats, TrainStep};
use crate::backend::Kernels;
use crate::error::{Error, Result};
use crate::model::timing::Section;
use crate::model::{Activations, Adapters, Base, Batch, FrozenModel, LoraLayout, Transformer};
use crate::optim::CosineSchedule;
use crate::run::{RunDir, RunLock, TrainConfig};
use crate::telemetry::events::{DataSummary, ParamSummary};
use crate::telemetry::{
    CheckpointKind, ConsoleMode, ConsoleSink, EndReason, Event, EventBus, EventSink, JsonlSink,
    LossKind,
};
use crate::tokenizer::Tokenizer;
use crate::util::fsutil::remove_stale_temp_files;

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

/// A LoRA run's frozen model and the layout of the adapters it trains (the step state's
/// parameters).
struct LoraRun {
    base: FrozenStore,
    layout: LoraLayout,
}

/// How a LoRA run holds its frozen model (`--base-weights`).
enum FrozenStore {
    F32(Vec<f32>),
    Compact(FrozenModel),
}

impl FrozenStore {
    fn view(&self) -> Base<'_> {
        match self {
            FrozenStore::F32(p) => Base::F32(p),
            FrozenStore::Compact(m) => Base::Compact(m),
        }
    }
}

/// A run in progress.
struct Trainer {
    cfg: TrainConfig,
    paths: RunDir,
    stop_after: Option<usize>,
    stop_flag: Option<Arc<AtomicBool>>,
    model: Transformer,
    kernels: Box<dyn Kernels>,
    tokenizer: Option<Box<dyn Tokenizer>>,
    data: TrainData,
    data_source: String,
    state: StepState,
    /// With `--lora-rank`: the frozen model; `state` then holds the adapters.
    lora: Option<LoraRun>,
    scaler: LossScaler,
    /// CPU use, power and memory readings.
    meter: Meter,
    schedule: CosineSchedule,
    counters: Counters,
    bus: EventBus,
    /// The fixed validation rows (inputs, targets).
    val_rows: Vec<Row>,
    /// Said once the run starts: warnings, and notes for the run header.
    warnings: Vec<String>,
    notes: Vec<String>,
    /// This trainer owns the run folder while it runs (rank 0 of a distributed job only).
    _lock: Option<RunLock>,
    /// The ranks of a data-parallel job ([`Single`] alone).
    ranks: Arc<dyn Collective>,
    /// How the gradient (or DiLoCo's weight change) is cut for the sums across ranks.
    buckets: Buckets,
    comm: CommOptions,
    /// DiLoCo's outer optimizer (`--distributed-mode diloco`).
    outer: Option<OuterState>,
    /// The update of the last DiLoCo outer step.
    last_sync: u64,
}

impl Trainer {
    /// Resolves the run, prepares the kernels, then (and only then) writes the run folder.
    fn start(cfg: TrainConfig, mut opts: RunOptions) -> Result<Self> {
        let paths = RunDir::new(opts.run_dir.clone());
        let ranks: Arc<dyn Collective> = opts.ranks.clone().unwrap_or_else(|| Arc::new(Single));
        let leader = ranks.rank() == 0;
        let mut bus = event_bus(&mut opts, leader);
        let (mut warnings, mut notes) = (Vec::new(), std::mem::take(&mut opts.notes));
        if let Some(w) = thread_warning(opts.threads) {
            warnings.push(w);
        }

        // The run folder is this trainer's from here on (a second one is refused); what a
        // killed predecessor left half-written goes. Only rank 0 writes in it.
        // A lone trainer killed while starting leaves its lock and nothing else: `--resume`
        // starts that run afresh (decided before this trainer takes the lock; MPI ranks do not
        // share what they see of the folder, so they keep the error).
        let killed_while_starting = ranks.size() == 1 && paths.holds_only_a_lock();
        let lock = if leader {
            Some(take_folder(&paths, &mut warnings)?)
        } else {
            None
        };

        // What the run is: its settings, model, data and tokenizer, the point it resumes from.
        let request = opts.resolve_request(&paths, killed_while_starting);
        let mut log = |m: &str| bus.emit(Event::Info { message: m.into() });
        let run = resolve(
            cfg,
            &request,
            ranks.as_ref(),
            &mut log,
            &mut warnings,
            &mut notes,
        )?;
        let ResolvedRun {
            cfg,
            model,
            data,
            resume,
            init,
            continues_folder,
        } = run;

        // The memory the run needs, against what the machine has; then the kernels, prepared
        // once for this shape: a backend fails here, not mid-run.
        let kernels = prepare_kernels(&cfg, &model, &opts, &paths, &mut bus, resume.as_ref())?;
        warnings.extend(kernels.warnings());

        // Parameters, optimizer and data position.
        let saved_scale = resume.as_ref().and_then(|r| r.checkpoint.meta.loss_scale);
        let scaler = LossScaler::new(
            cfg.loss_scale.resolve(kernels.needs_loss_scaling()),
            saved_scale,
            cfg.max_bad_updates,
        );
        let lora = match cfg.lora()? {
            Some(l) => Some(LoraLayout::new(&model.cfg, l)?),
            None => None,
        };
        if let Some(l) = &lora {
            let total = model.layout.total();
            notes.push(format!(
                "LoRA rank {} (alpha {}) on {}: {} trainable parameters ({:.2}% of the model's {}); the model is frozen",
                l.cfg.rank,
                l.cfg.alpha,
                l.cfg.targets.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(","),
                l.total(),
                100.0 * l.total() as f64 / total as f64,
                total
            ));
        }
        let mut train_data = data.data;
        let last_sync = resume
            .as_ref()
            .and_then(|r| r.checkpoint.meta.diloco)
            .map_or(0, |d| d.last_sync);
        let (state, counters, lora, outer) = initial_state(
            &cfg,
            &model,
            &mut train_data,
            resume,
            init,
            lora,
            ranks.rank(),
        )?;
        let buckets = match &lora {
            None => Buckets::for_model(&model.layout, opts.comm.bucket_values),
            Some(l) => Buckets::whole(l.layout.total(), opts.comm.bucket_values),
        };

        // The run folder, then its event log (which receives everything said so far).
        if leader {
            let tokenizer = data.tokenizer.as_deref();
            let chat = train_data.template();
            run_folder::prepare(&paths, continues_folder, &cfg, &model.cfg, tokenizer, chat)?;
            bus.attach_log(Box::new(JsonlSink::open(&paths.events())?));
        }

        Ok(Trainer {
            schedule: CosineSchedule {
                lr: cfg.lr,
                min_lr_ratio: cfg.min_lr_ratio,
                warmup: cfg.warmup,
                total: cfg.steps,
            },
            val_rows: train_data.val_rows(cfg.eval_batches * cfg.batch, cfg.seq),
            stop_after: opts.stop_after,
            stop_flag: opts.stop_flag,
            tokenizer: data.tokenizer,
            data_source: data.source,
            data: train_data,
            state,
            lora,
            scaler,
            meter: Meter::open(),
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
            buckets,
            comm: opts.comm,
            outer,
            last_sync,
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
        let (k, b, t) = (self.kernels.as_ref(), self.cfg.batch, self.cfg.seq);
        let mut acts = match &self.lora {
            None => self.model.activations(k, b, t),
            Some(l) => self.model.activations_adapted(k, &l.layout, b, t),
        };
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
        if reason == EndReason::Completed {
            if self.leader() && !self.val_rows.is_empty() {
                self.evaluate(&mut acts)?;
            }
            // Every rank: a DiLoCo checkpoint gathers the other ranks' states.
            self.save_latest(CheckpointKind::Final)?;
            if self.leader() {
                sample = self.sample()?;
            }
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
            model: model.cfg.clone(),
            train: cfg.clone(),
            params: ParamSummary {
                total: counts.total,
                embedding: counts.embedding,
                non_embedding: counts.non_embedding,
            },
            data: DataSummary {
                source: self.data_source.clone(),
                train_tokens: self.data.sizes().0,
                val_tokens: self.data.sizes().1,
                split: self.data.split(),
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
            power_source: self.meter.power_source(),
        };
        self.bus.emit(event);
        Ok(())
    }

    /// The loss scaler's verdict on an update (a non-finite one is skipped, and too many in a
    /// row stop the run, naming the first non-finite tensor).
    fn judge(&mut self, stats: &StepStats) -> Result<Verdict> {
        let mut detail = format!("loss {}, gradient norm {}", stats.loss, stats.grad_norm);
        if !stats.applied {
            if let Some((name, n)) = self.first_non_finite(&self.state.params) {
                detail.push_str(&format!(
                    "; weights non-finite first in {name} ({n} values)"
                ));
            } else if let Some((name, n)) = self.first_non_finite(&self.state.grads) {
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
        Ok(verdict)
    }

    /// The first trained tensor (the model's, or the adapters') of `buf` holding non-finite
    /// values, with how many.
    fn first_non_finite<'s>(&'s self, buf: &[f32]) -> Option<(&'s str, usize)> {
        let tensors = match &self.lora {
            None => &self.model.layout.tensors,
            Some(l) => &l.layout.tensors,
        };
        crate::model::params::first_non_finite(tensors, buf)
    }

    /// The model's weights as inference reads them: the trained parameters, or for a LoRA
    /// run the frozen model with the adapters merged in.
    fn inference_weights(&self) -> std::borrow::Cow<'_, [f32]> {
        match &self.lora {
            None => std::borrow::Cow::Borrowed(&self.state.params),
            Some(l) => {
                let base = match &l.base {
                    FrozenStore::F32(p) => std::borrow::Cow::Borrowed(&p[..]),
                    FrozenStore::Compact(m) => {
                        std::borrow::Cow::Owned(m.to_f32(&self.model.layout))
                    }
                };
                std::borrow::Cow::Owned(l.layout.merge(
                    &self.model.layout,
                    &base,
                    &self.state.params,
                ))
            }
        }
    }

    /// One optimizer update, and its `step` event.
    fn update(&mut self, acts: &mut Activations, session: &mut Session) -> Result<()> {
        let t0 = Instant::now();
        self.meter.begin();
        acts.timings.reset();
        let (b, t_len) = (self.cfg.batch, self.cfg.seq);
        let lr = self.schedule.lr_at(self.counters.step as usize);
        let sync = GradSync {
            ranks: self.ranks.as_ref(),
            buckets: &self.buckets,
            comm: self.cfg.grad_comm,
            overlap: self.comm.overlap,
        };
        let outer = self.cfg.outer();
        let comm = if outer.is_some() {
            StepComm::LocalUpdates(self.ranks.as_ref())
        } else if self.ranks.size() > 1 {
            StepComm::SumGradients(sync)
        } else {
            StepComm::Alone
        };
        let step = TrainStep {
            model: &self.model,
            kernels: self.kernels.as_ref(),
            accum: self.cfg.accum,
            clip: self.cfg.clip,
            loss_scale: self.scaler.scale() as f32,
            comm,
            frozen: self.lora.as_ref().map(|l| FrozenBase {
                params: l.base.view(),
                lora: &l.layout,
                dropout_seed: FrozenBase::dropout_seed(self.cfg.seed, self.counters.step),
            }),
        };
        let reported_scale = self.scaler.reported();
        let data = &mut self.data;
        let (rank, size) = (self.ranks.rank(), self.ranks.size());
        // A micro-batch of the whole job is `b x size` windows of one stream; this rank
        // trains on its `b` of them and skips the others' (see `distributed`).
        let mut next_batch = |inputs: &mut [u32], targets: &mut [u32]| {
            for g in 0..b * size {
                if g / b != rank {
                    data.skip_row();
                    continue;
                }
                let s = g % b;
                let rows = s * t_len..(s + 1) * t_len;
                data.next_row(t_len, &mut inputs[rows.clone()], &mut targets[rows]);
            }
        };
        let stats = step.run(&mut self.state, acts, &mut next_batch, lr)?;
        // DiLoCo: every H updates (and at the end) the outer step makes the ranks agree.
        if let (Some(o), Some(state)) = (outer, self.outer.as_mut()) {
            let done = self.counters.step + 1;
            if o.syncs_after(done, self.cfg.steps as u64) {
                let t = Instant::now();
                state.step(&mut self.state.params, &o, &sync, &mut self.state.comm)?;
                self.kernels.weights_changed();
                acts.timings.add(Section::Allreduce, t);
                self.last_sync = done;
            }
        }
        let verdict = self.judge(&stats)?;
        let tokens = self.cfg.tokens_per_update();
        let wall = t0.elapsed().as_secs_f64();
        let Readings {
            cpu_percent,
            energy_j,
        } = self.meter.end(wall);
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
        let rss = meter::rss_due(c.step, session.first_step);
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
        for chunk in self.val_rows.chunks(b) {
            if chunk.len() < b {
                break;
            }
            for (s, (i, t)) in chunk.iter().enumerate() {
                inputs[s * t_len..(s + 1) * t_len].copy_from_slice(i);
                targets[s * t_len..(s + 1) * t_len].copy_from_slice(t);
            }
            let batch = Batch {
                inputs: &inputs,
                targets: &targets,
            };
            let k = self.kernels.as_ref();
            sum += match &self.lora {
                None => self.model.loss(k, &self.state.params, acts, batch)?,
                Some(l) => {
                    let adapters = Adapters {
                        layout: &l.layout,
                        params: &self.state.params,
                        dropout_seed: None,
                    };
                    self.model
                        .loss_adapted(k, l.base.view(), &adapters, acts, batch)?
                }
            };
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
}

/// The events' fan-out: the console (rank 0 only) and the caller's sinks.
fn event_bus(opts: &mut RunOptions, leader: bool) -> EventBus {
    let console = if leader {
        opts.console
    } else {
        ConsoleMode::Off
    };
    let mut sinks: Vec<Box<dyn EventSink>> = vec![Box::new(ConsoleSink::new(console))];
    if leader {
        sinks.append(&mut opts.extra_sinks);
    }
    EventBus::new(sinks)
}

/// More threads than logical cores slow dense math down: said once.
fn thread_warning(threads: usize) -> Option<String> {
    let cores = num_cpus::get();
    (threads > cores).then(|| {
        format!(
            "{threads} threads on a machine with {cores} logical cores: the threads take turns and dense math slows down (the default is the physical cores, {})",
            default_threads()
        )
    })
}

/// Locks the run folder for this trainer and removes what an interrupted write left.
fn take_folder(paths: &RunDir, warnings: &mut Vec<String>) -> Result<RunLock> {
    let lock = RunLock::acquire(&paths.dir, warnings)?;
    let stale = remove_stale_temp_files(&paths.checkpoints()) + remove_stale_temp_files(&paths.dir);
    if stale > 0 {
        warnings.push(format!(
            "removed {stale} unfinished temporary file(s) left by an interrupted write"
        ));
    }
    Ok(lock)
}

/// The kernels of the run, prepared for its shape after the memory check (a spent Neural
/// Engine compile budget goes to [`compile_budget`]).
fn prepare_kernels(
    cfg: &TrainConfig,
    model: &Transformer,
    opts: &RunOptions,
    paths: &RunDir,
    bus: &mut EventBus,
    resume: Option<&ResumePoint>,
) -> Result<Box<dyn Kernels>> {
    let mut kernels = cfg.backend().kernels_with(opts.kernel_options)?;
    let lora = match cfg.lora()? {
        Some(l) => Some(LoraLayout::new(&model.cfg, l)?),
        None => None,
    };
    let lora = lora.as_ref().map(|l| (l, cfg.base_weights));
    super::memory::MemoryNeed::of(model, lora, kernels.as_ref(), cfg.batch, cfg.seq)
        .check(crate::util::mem::available_bytes())?;
    if let Err(e) = kernels.prepare(&model.step_shape(cfg.batch, cfg.seq)) {
        let step = resume.map_or(0, |r| r.checkpoint.meta.step);
        let allowed = opts.restart_on_compile_budget;
        return Err(compile_budget::restart_or_fail(
            e, allowed, paths, bus, step,
        ));
    }
    Ok(kernels)
}
