//! The training loop: data, model, AdamW with warmup + cosine, clipping, accumulation,
//! evaluation, crash-safe checkpoints with exact resume, events and a final sample.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::config::TrainConfig;
use crate::backend::Kernels;
use crate::data::{Dataset, WindowSampler, builtin};
use crate::error::{Error, Result};
use crate::formats::checkpoint::{Checkpoint, CheckpointMeta, CheckpointRef, FORMAT_VERSION};
use crate::generate::{GenerateOptions, Sampling, generate};
use crate::model::config::PRESETS;
use crate::model::{ModelConfig, Transformer, VocabCompaction};
use crate::optim::{AdamW, AdamWConfig, CosineSchedule, UpdateScale, update_scale};
use crate::telemetry::events::{DataSummary, ParamSummary, unix_now};
use crate::telemetry::{ConsoleMode, ConsoleSink, Event, EventSink, JsonlSink};
use crate::tokenizer::{self, Tokenizer};
use crate::util::fsutil::{create_dir_all, write_atomic};

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
    /// Extra event sinks (dashboards, tests).
    pub extra_sinks: Vec<Box<dyn EventSink + Send>>,
    /// Where the built-in dataset is cached.
    pub cache_root: PathBuf,
    /// On resume: the model the user asked for, to refuse a checkpoint of another model.
    pub requested_model: Option<String>,
    /// On resume: a new total number of updates.
    pub steps_override: Option<usize>,
    /// Print the final sample to stdout.
    pub print_sample: bool,
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
            steps_override: None,
            print_sample: true,
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
    /// `completed`, `interrupted` or `stopped`.
    pub reason: String,
    /// Training loss of each update of this session.
    pub losses: Vec<f64>,
    pub final_val_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub sample: Option<String>,
}

/// Paths inside a run directory.
pub struct RunPaths {
    pub dir: PathBuf,
}

impl RunPaths {
    pub fn checkpoints(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }
    pub fn latest(&self) -> PathBuf {
        self.checkpoints().join("latest")
    }
    pub fn latest_prev(&self) -> PathBuf {
        self.checkpoints().join("latest.prev")
    }
    pub fn best(&self) -> PathBuf {
        self.checkpoints().join("best")
    }
    pub fn events(&self) -> PathBuf {
        self.dir.join("events.jsonl")
    }
}

/// Loads the newest valid "latest" checkpoint of a run: `latest`, or `latest.prev` (with a
/// warning) when `latest` is damaged or missing.
pub fn load_latest(paths: &RunPaths, warnings: &mut Vec<String>) -> Result<(Checkpoint, PathBuf)> {
    let latest = paths.latest();
    match Checkpoint::load(&latest) {
        Ok(c) => Ok((c, latest)),
        Err(e) => {
            let prev = paths.latest_prev();
            if prev.exists() {
                let c = Checkpoint::load(&prev)?;
                warnings.push(format!(
                    "{e}; resuming from the previous checkpoint {}",
                    prev.display()
                ));
                Ok((c, prev))
            } else if !latest.exists() {
                Err(Error::checkpoint(
                    &latest,
                    format!("no checkpoint to resume from in {}", paths.dir.display()),
                ))
            } else {
                Err(e)
            }
        }
    }
}

/// Resolved data and tokenizer.
struct DataSetup {
    data: Dataset,
    tokenizer: Option<Box<dyn Tokenizer>>,
    source: String,
}

/// Resolves the data and its tokenizer. `model_tok` is the tokenizer that came with the
/// weights (`--init-from`, or the checkpoint on resume), which takes precedence over one found
/// next to the data; `--tokenizer` takes precedence over both.
fn setup_data(
    cfg: &TrainConfig,
    cache_root: &Path,
    console: ConsoleMode,
    model_tok: Option<Box<dyn Tokenizer>>,
) -> Result<DataSetup> {
    if cfg.data == "builtin" {
        if cfg.tokenizer.is_some() {
            return Err(Error::invalid(
                "the built-in data comes with its own tokenizer; drop --tokenizer or give --data",
            ));
        }
        if cfg.init_from.is_some() {
            return Err(Error::invalid(
                "the built-in data has its own tokenizer, which a pretrained model does not share; \
                 tokenize your text with the model's tokenizer (handgrad prepare) and pass --data",
            ));
        }
        let mut log = |s: &str| {
            if console != ConsoleMode::Quiet {
                eprintln!("{s}");
            }
        };
        let b = builtin::ensure(cache_root, &mut log)?;
        let data = Dataset::from_files(
            std::slice::from_ref(&b.train),
            std::slice::from_ref(&b.val),
            0.0,
        )?;
        let tok = tokenizer::load(&b.tokenizer)?;
        return Ok(DataSetup {
            data,
            tokenizer: Some(tok),
            source: format!("built-in stories ({})", b.dir.display()),
        });
    }
    let path = PathBuf::from(&cfg.data);
    let data = Dataset::open(&path, cfg.val_fraction)?;
    let tok_path = match &cfg.tokenizer {
        Some(t) => Some(PathBuf::from(t)),
        None => {
            let dir = if path.is_dir() {
                path.clone()
            } else {
                path.parent().map(Path::to_path_buf).unwrap_or_default()
            };
            tokenizer::find_in_dir(&dir)
        }
    };
    let tokenizer = match (tok_path, model_tok) {
        (Some(p), _) if cfg.tokenizer.is_some() => Some(tokenizer::load(&p)?),
        (_, Some(t)) => Some(t),
        (Some(p), None) => Some(tokenizer::load(&p)?),
        (None, None) => None,
    };
    if let (Some(t), Some(id)) = (&tokenizer, &data.tokenizer_id)
        && t.id() != id
    {
        return Err(Error::invalid(format!(
            "the data was tokenized with tokenizer {id}, but the tokenizer in use is {} ({})",
            t.id(),
            cfg.tokenizer
                .as_deref()
                .unwrap_or("from the model or next to the data")
        )));
    }
    Ok(DataSetup {
        data,
        tokenizer,
        source: cfg.data.clone(),
    })
}

/// The model config for a fresh run: presets take the tokenizer's vocabulary, explicit
/// configs must cover it.
fn resolve_model(spec: &str, tok: Option<&dyn Tokenizer>) -> Result<ModelConfig> {
    let mut mc = ModelConfig::from_preset_or_path(spec)?;
    let is_preset = PRESETS.contains(&spec.to_ascii_lowercase().as_str());
    if let Some(t) = tok {
        if is_preset {
            mc.vocab_size = t.vocab_size();
            mc.bos_token_id = t.bos_id();
            mc.eos_token_id = t.eos_id();
        } else if t.vocab_size() > mc.vocab_size {
            return Err(Error::config(
                spec,
                format!(
                    "field `vocab_size` ({}) is smaller than the tokenizer's vocabulary ({})",
                    mc.vocab_size,
                    t.vocab_size()
                ),
            ));
        }
    }
    mc.validate(spec)?;
    Ok(mc)
}

/// Names the fields in which two model configs differ.
fn config_differences(a: &ModelConfig, b: &ModelConfig) -> Vec<String> {
    let (ja, jb) = (a.to_hf_json(), b.to_hf_json());
    let mut diffs = Vec::new();
    if let (Some(oa), Some(ob)) = (ja.as_object(), jb.as_object()) {
        for (k, va) in oa {
            if k == "bos_token_id" || k == "eos_token_id" {
                continue;
            }
            let vb = ob.get(k).cloned().unwrap_or(serde_json::Value::Null);
            if *va != vb {
                diffs.push(format!("{k} {vb} in the checkpoint vs {va} requested"));
            }
        }
    }
    diffs
}

fn check_run_dir_writable(dir: &Path) -> Result<()> {
    create_dir_all(dir)?;
    let probe = dir.join(format!(".write-test-{}", std::process::id()));
    std::fs::write(&probe, b"ok").map_err(|e| Error::io("writing into the run folder", dir, e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
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

/// Counters restored from a checkpoint.
#[derive(Default)]
struct ResumeState {
    step: u64,
    tokens_seen: u64,
    best_val_loss: Option<f64>,
    last_val_loss: Option<f64>,
    last_train_loss: Option<f64>,
    train_seconds: f64,
    resumed_from: Option<u64>,
}

/// State of a run in progress.
struct Trainer {
    cfg: TrainConfig,
    opts: RunOptions,
    paths: RunPaths,
    model: Transformer,
    kernels: Box<dyn Kernels>,
    tokenizer: Option<Box<dyn Tokenizer>>,
    data: Dataset,
    sampler: WindowSampler,
    params: Vec<f32>,
    grads: Vec<f32>,
    opt: AdamW,
    schedule: CosineSchedule,
    step: u64,
    tokens_seen: u64,
    best_val_loss: Option<f64>,
    last_val_loss: Option<f64>,
    last_train_loss: Option<f64>,
    train_seconds: f64,
    sinks: Vec<Box<dyn EventSink + Send>>,
    data_source: String,
    val_windows: Vec<Vec<u32>>,
    resumed_from: Option<u64>,
    warnings: Vec<String>,
}

impl Trainer {
    fn start(mut cfg: TrainConfig, mut opts: RunOptions) -> Result<Self> {
        let paths = RunPaths {
            dir: opts.run_dir.clone(),
        };
        let mut warnings = Vec::new();
        // 1. Everything is loaded and validated before anything is written.
        let resume = if opts.resume {
            let (ck, from) = load_latest(&paths, &mut warnings)?;
            let saved: TrainConfig =
                serde_json::from_value(ck.meta.train_config.clone()).map_err(|e| {
                    Error::checkpoint(&from, format!("unreadable training config: {e}"))
                })?;
            cfg = saved;
            if let Some(s) = opts.steps_override {
                if (s as u64) < ck.meta.step {
                    return Err(Error::invalid(format!(
                        "--steps {s} is below the {} updates the checkpoint already has",
                        ck.meta.step
                    )));
                }
                if s != cfg.steps {
                    warnings.push(format!(
                        "--steps changed from {} to {s}: the learning-rate schedule is re-planned from here",
                        cfg.steps
                    ));
                }
                cfg.steps = s;
            }
            Some((ck, from))
        } else {
            None
        };
        cfg.validate()?;
        crate::backend::kernels_for(&cfg.precision)?;
        if cfg.precision == "bf16" && crate::backend::bf16_emulated() {
            warnings.push(
                "this CPU has no AVX512_BF16: bf16 matmuls are emulated (same numerics, slower than fp32)".into(),
            );
        }
        // Fail fast on a bad model name or config before any data work.
        if cfg.init_from.is_none() {
            ModelConfig::from_preset_or_path(&cfg.model)?;
        }
        if let Some(spec) = &opts.requested_model {
            ModelConfig::from_preset_or_path(spec)?;
        }
        // Weights to start from: a pretrained model (fresh run) or the checkpoint (resume).
        let init = match (&resume, &cfg.init_from) {
            (None, Some(p)) => Some(crate::formats::load_model(Path::new(p))?),
            _ => None,
        };
        let model_tok = match (&resume, &init) {
            (Some((ck, from)), _) if !ck.tokenizer.is_empty() => {
                Some(tokenizer::from_bytes(ck.tokenizer.clone(), from)?)
            }
            (_, Some(m)) => match &m.tokenizer {
                Some(t) => Some(t.load(Path::new(cfg.init_from.as_deref().unwrap_or("")))?),
                None => None,
            },
            _ => None,
        };
        let setup = setup_data(&cfg, &opts.cache_root, opts.console, model_tok)?;
        let tok_ref = setup.tokenizer.as_deref();
        let model_cfg = match &resume {
            Some((ck, from)) => {
                let mc =
                    ModelConfig::from_hf_json(&ck.meta.model_config, &from.display().to_string())?;
                if let Some(spec) = &opts.requested_model {
                    let want = resolve_model(spec, tok_ref)?;
                    let diffs = config_differences(&want, &mc);
                    if !diffs.is_empty() {
                        return Err(Error::checkpoint(
                            from,
                            format!(
                                "holds a different model than --model {spec}: {}",
                                diffs.join(", ")
                            ),
                        ));
                    }
                }
                let tok_id = tok_ref
                    .map(|t| t.id().to_string())
                    .unwrap_or_else(|| "none".into());
                if tok_id != ck.meta.tokenizer_id {
                    return Err(Error::checkpoint(
                        from,
                        format!(
                            "was trained with tokenizer {}, but this data uses {tok_id}",
                            ck.meta.tokenizer_id
                        ),
                    ));
                }
                mc
            }
            None => match &init {
                Some(m) => {
                    if let Some(t) = tok_ref
                        && t.vocab_size() > m.cfg.vocab_size
                    {
                        return Err(Error::invalid(format!(
                            "the tokenizer has {} ids but the model in {} only {}",
                            t.vocab_size(),
                            cfg.init_from.as_deref().unwrap_or(""),
                            m.cfg.vocab_size
                        )));
                    }
                    for w in &m.warnings {
                        warnings.push(w.clone());
                    }
                    m.cfg.clone()
                }
                None => resolve_model(&cfg.model, tok_ref)?,
            },
        };
        if cfg.seq > model_cfg.max_seq_len {
            return Err(Error::invalid(format!(
                "--seq {} exceeds the model's {} positions",
                cfg.seq, model_cfg.max_seq_len
            )));
        }
        setup.data.validate(model_cfg.vocab_size, cfg.seq)?;
        if setup.data.val.is_empty() && (cfg.eval_every > 0 || cfg.eval_batches > 0) {
            warnings.push("no validation data: evaluation is skipped".into());
        }
        let mut model = Transformer::new(model_cfg);
        if cfg.vocab_compaction {
            let kept = match &resume {
                Some((ck, _)) => ck.meta.vocab_kept.clone(),
                None => None,
            };
            let comp = match kept {
                Some(k) => VocabCompaction::from_kept(k, model.cfg.vocab_size),
                None => {
                    let mut present = vec![false; model.cfg.vocab_size];
                    setup.data.mark_present(&mut present);
                    VocabCompaction::from_presence(&present)
                }
            };
            model.set_compaction(Some(comp));
        }

        // 2. The run directory.
        if !opts.resume && (paths.latest().exists() || paths.events().exists()) {
            return Err(Error::invalid(format!(
                "{} already holds a training run; continue it with --resume or choose another --run-dir",
                paths.dir.display()
            )));
        }
        check_run_dir_writable(&paths.dir)?;
        create_dir_all(&paths.checkpoints())?;
        let cfg_json = serde_json::to_vec_pretty(&cfg)
            .map_err(|e| Error::json("encoding the training config", e))?;
        write_atomic(&paths.dir.join("train_config.json"), |f| {
            std::io::Write::write_all(f, &cfg_json)
        })?;
        if !opts.resume {
            let mc = serde_json::to_vec_pretty(&model.cfg.to_hf_json())
                .map_err(|e| Error::json("encoding config.json", e))?;
            write_atomic(&paths.dir.join("config.json"), |f| {
                std::io::Write::write_all(f, &mc)
            })?;
            if let Some(t) = &setup.tokenizer {
                write_atomic(&paths.dir.join(t.file_name()), |f| {
                    std::io::Write::write_all(f, t.file_bytes())
                })?;
            }
        }

        // 3. Parameters and optimizer state.
        let adam_cfg = AdamWConfig {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
        };
        let mut opt = AdamW::new(adam_cfg, &model.layout);
        let mut sampler = WindowSampler::new(&setup.data, cfg.seq, cfg.seed);
        let mut state = ResumeState::default();
        let params = match resume {
            Some((ck, from)) => {
                if ck.params.len() != model.layout.total() {
                    return Err(Error::checkpoint(
                        &from,
                        "parameter count does not match its model config",
                    ));
                }
                let Some((m, v)) = ck.moments else {
                    return Err(Error::checkpoint(
                        &from,
                        "holds weights only (no optimizer state); cannot resume",
                    ));
                };
                opt.m = m;
                opt.v = v;
                opt.t = ck.meta.adam_t;
                sampler.restore(&ck.meta.sampler);
                state = ResumeState {
                    step: ck.meta.step,
                    tokens_seen: ck.meta.tokens_seen,
                    best_val_loss: ck.meta.best_val_loss,
                    last_val_loss: ck.meta.last_val_loss,
                    last_train_loss: ck.meta.last_train_loss,
                    train_seconds: ck.meta.train_seconds,
                    resumed_from: Some(ck.meta.step),
                };
                ck.params
            }
            None => match init {
                Some(m) => m.params,
                None => model.layout.init(model.cfg.n_layers, cfg.seed),
            },
        };
        let mut sinks: Vec<Box<dyn EventSink + Send>> = vec![
            Box::new(JsonlSink::open(&paths.events())?),
            Box::new(ConsoleSink::new(opts.console)),
        ];
        sinks.append(&mut opts.extra_sinks);
        Ok(Trainer {
            grads: vec![0.0; model.layout.total()],
            params,
            schedule: CosineSchedule {
                lr: cfg.lr,
                min_lr_ratio: cfg.min_lr_ratio,
                warmup: cfg.warmup,
                total: cfg.steps,
            },
            step: state.step,
            tokens_seen: state.tokens_seen,
            best_val_loss: state.best_val_loss,
            last_val_loss: state.last_val_loss,
            last_train_loss: state.last_train_loss,
            train_seconds: state.train_seconds,
            resumed_from: state.resumed_from,
            sinks,
            val_windows: setup
                .data
                .val_windows(cfg.eval_batches * cfg.batch, cfg.seq),
            warnings,
            kernels: crate::backend::kernels_for(&cfg.precision)?,
            tokenizer: setup.tokenizer,
            data_source: setup.source,
            data: setup.data,
            sampler,
            opt,
            model,
            paths,
            cfg,
            opts,
        })
    }

    fn emit(&mut self, e: Event) -> Result<()> {
        for s in &mut self.sinks {
            s.emit(&e)?;
        }
        Ok(())
    }

    fn loss_kind(&self) -> String {
        if self.model.compaction.is_some() {
            "compacted".into()
        } else {
            "full".into()
        }
    }

    fn run(mut self) -> Result<TrainOutcome> {
        let wall = Instant::now();
        for w in std::mem::take(&mut self.warnings) {
            self.emit(Event::Warning { message: w })?;
        }
        let (b, t_len) = (self.cfg.batch, self.cfg.seq);
        let mut acts = self.model.activations(b, t_len);
        let counts = self.model.cfg.param_counts();
        let flops_per_update = self.model.cfg.train_flops(b, t_len) * self.cfg.accum as f64;
        let tokens_per_update = self.cfg.tokens_per_update();
        let start = Event::RunStart {
            run_dir: self.paths.dir.display().to_string(),
            model: self.model.cfg.to_hf_json(),
            train: serde_json::to_value(&self.cfg)
                .map_err(|e| Error::json("encoding the training config", e))?,
            params: ParamSummary {
                total: counts.total,
                embedding: counts.embedding,
                non_embedding: counts.non_embedding,
            },
            data: DataSummary {
                source: self.data_source(),
                train_tokens: self.data.train_tokens(),
                val_tokens: self.data.val_tokens(),
                split: self.data.split.clone(),
            },
            tokenizer: self.tokenizer_id(),
            tokens_per_update,
            flops_per_update,
            activation_bytes: acts.bytes(),
            threads: rayon::current_num_threads(),
            vocab_compacted_to: self.model.compaction.as_ref().map(|c| c.len()),
            resumed_from_step: self.resumed_from,
        };
        self.emit(start)?;

        let mut window = vec![0u32; t_len + 1];
        let mut inputs = vec![0u32; b * t_len];
        let mut targets = vec![0u32; b * t_len];
        let mut losses = Vec::new();
        let mut update_ms = Vec::new();
        let total = self.cfg.steps as u64;
        let mut reason = "completed";
        let session_start = self.step;

        while self.step < total {
            let t0 = Instant::now();
            self.grads.fill(0.0);
            let mut loss_sum = 0.0;
            for _ in 0..self.cfg.accum {
                for s in 0..b {
                    self.sampler.next_window(&self.data, &mut window);
                    inputs[s * t_len..(s + 1) * t_len].copy_from_slice(&window[..t_len]);
                    targets[s * t_len..(s + 1) * t_len].copy_from_slice(&window[1..]);
                }
                loss_sum += self.model.forward_backward(
                    self.kernels.as_ref(),
                    &self.params,
                    &mut self.grads,
                    &mut acts,
                    &inputs,
                    &targets,
                    1.0,
                )?;
            }
            // Average over the micro-steps actually taken, and clip: folded into the update.
            let micro = self.cfg.accum;
            let t_opt = Instant::now();
            let loss = loss_sum / micro as f64;
            let UpdateScale {
                grad_norm,
                clipped,
                factor,
            } = update_scale(&self.grads, micro, self.cfg.clip);
            if !loss.is_finite() || !grad_norm.is_finite() {
                return Err(Error::invalid(format!(
                    "training diverged at update {}: loss {loss}, gradient norm {grad_norm} (try a lower --lr); the last checkpoint is intact",
                    self.step + 1
                )));
            }
            let lr = self.schedule.lr_at(self.step as usize);
            self.opt.step(&mut self.params, &self.grads, lr, factor);
            acts.timings
                .add(crate::model::timing::Section::Optimizer, t_opt);
            self.step += 1;
            self.tokens_seen += tokens_per_update as u64;
            let secs = t0.elapsed().as_secs_f64();
            self.train_seconds += secs;
            update_ms.push(secs * 1e3);
            losses.push(loss);
            self.last_train_loss = Some(loss);
            self.emit(Event::Step {
                step: self.step,
                total_steps: total,
                loss,
                loss_kind: self.loss_kind(),
                lr,
                grad_norm,
                clipped,
                ms: secs * 1e3,
                tokens_per_s: tokens_per_update as f64 / secs,
                tokens_seen: self.tokens_seen,
            })?;

            let last = self.step == total;
            if self.cfg.eval_every > 0
                && self.step.is_multiple_of(self.cfg.eval_every as u64)
                && !last
            {
                self.evaluate(&mut acts)?;
            }
            let interrupted = self
                .opts
                .stop_flag
                .as_ref()
                .is_some_and(|f| f.load(Ordering::SeqCst));
            let stop_now = self
                .opts
                .stop_after
                .is_some_and(|n| self.step - session_start >= n as u64);
            if interrupted || stop_now {
                reason = if interrupted {
                    "interrupted"
                } else {
                    "stopped"
                };
                self.save_latest(if interrupted { "interrupt" } else { "latest" })?;
                break;
            }
            if self.cfg.save_every > 0
                && self.step.is_multiple_of(self.cfg.save_every as u64)
                && !last
            {
                self.save_latest("latest")?;
            }
        }

        let mut sample = None;
        if reason == "completed" {
            if !self.val_windows.is_empty() {
                self.evaluate(&mut acts)?;
            }
            self.save_latest("final")?;
            sample = self.sample()?;
        }
        let mut sorted = update_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let n = update_ms.len().max(1) as f64;
        let mean_ms = update_ms.iter().sum::<f64>() / n;
        let median_ms = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
        self.emit(Event::RunEnd {
            step: self.step,
            reason: reason.into(),
            wall_s: wall.elapsed().as_secs_f64(),
            updates: update_ms.len() as u64,
            mean_ms_per_update: mean_ms,
            median_ms_per_update: median_ms,
            tokens_per_s: if mean_ms > 0.0 {
                tokens_per_update as f64 / (mean_ms / 1e3)
            } else {
                0.0
            },
            gflops_per_s: if mean_ms > 0.0 {
                flops_per_update / (mean_ms / 1e3) / 1e9
            } else {
                0.0
            },
            final_loss: self.last_train_loss,
            best_val_loss: self.best_val_loss,
            peak_rss_bytes: crate::util::mem::peak_rss_bytes(),
        })?;
        for s in &mut self.sinks {
            s.finish()?;
        }
        Ok(TrainOutcome {
            run_dir: self.paths.dir.clone(),
            step: self.step,
            reason: reason.into(),
            losses,
            final_val_loss: self.last_val_loss,
            best_val_loss: self.best_val_loss,
            sample,
        })
    }

    fn data_source(&self) -> String {
        self.data_source.clone()
    }

    fn tokenizer_id(&self) -> String {
        self.tokenizer
            .as_ref()
            .map(|t| t.id().to_string())
            .unwrap_or_else(|| "none".into())
    }

    /// Mean loss over the fixed validation windows; saves `best` on improvement.
    fn evaluate(&mut self, acts: &mut crate::model::Activations) -> Result<f64> {
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
            sum += self
                .model
                .loss(self.kernels.as_ref(), &self.params, acts, &inputs, &targets)?;
            batches += 1;
        }
        if batches == 0 {
            return Ok(f64::NAN);
        }
        let val = sum / batches as f64;
        self.last_val_loss = Some(val);
        let improved = self.best_val_loss.is_none_or(|b| val < b);
        if improved {
            self.best_val_loss = Some(val);
        }
        self.emit(Event::Eval {
            step: self.step,
            val_loss: val,
            loss_kind: self.loss_kind(),
            best_val_loss: self.best_val_loss.unwrap_or(val),
            ms: t0.elapsed().as_secs_f64() * 1e3,
        })?;
        if improved {
            self.save(&self.paths.best(), false, "best")?;
        }
        Ok(val)
    }

    fn checkpoint_meta(&self) -> Result<CheckpointMeta> {
        Ok(CheckpointMeta {
            format_version: FORMAT_VERSION,
            model_config: self.model.cfg.to_hf_json(),
            train_config: serde_json::to_value(&self.cfg)
                .map_err(|e| Error::json("encoding the training config", e))?,
            tokenizer_id: self.tokenizer_id(),
            tokenizer_file: self.tokenizer.as_ref().map(|t| t.file_name().to_string()),
            tokenizer_bytes: 0,
            n_params: self.params.len(),
            step: self.step,
            adam_t: self.opt.t,
            schedule_total: self.cfg.steps as u64,
            sampler: self.sampler.state(),
            tokens_seen: self.tokens_seen,
            best_val_loss: self.best_val_loss,
            last_val_loss: self.last_val_loss,
            last_train_loss: self.last_train_loss,
            vocab_kept: self.model.compaction.as_ref().map(|c| c.kept.clone()),
            train_seconds: self.train_seconds,
            written_unix: unix_now(),
        })
    }

    /// Writes a checkpoint straight from the live buffers (no copy of the weights or moments).
    fn save(&mut self, path: &Path, with_moments: bool, kind: &str) -> Result<()> {
        let t0 = Instant::now();
        let meta = self.checkpoint_meta()?;
        let bytes = CheckpointRef {
            meta: &meta,
            tokenizer: self
                .tokenizer
                .as_ref()
                .map(|t| t.file_bytes())
                .unwrap_or_default(),
            params: &self.params,
            moments: with_moments.then_some((self.opt.m.as_slice(), self.opt.v.as_slice())),
        }
        .save(path)?;
        self.emit(Event::Checkpoint {
            step: self.step,
            kind: kind.into(),
            path: path.display().to_string(),
            bytes,
            ms: t0.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Writes `checkpoints/latest`, keeping the previous one as `latest.prev`.
    fn save_latest(&mut self, kind: &str) -> Result<()> {
        let latest = self.paths.latest();
        if latest.exists() {
            std::fs::rename(&latest, self.paths.latest_prev())
                .map_err(|e| Error::io("rotating", &latest, e))?;
        }
        self.save(&latest, true, kind)
    }

    fn sample(&mut self) -> Result<Option<String>> {
        if self.cfg.sample_tokens == 0 {
            return Ok(None);
        }
        let Some(tok) = self.tokenizer.as_deref() else {
            let e = Event::Warning {
                message: "no tokenizer: skipping the sample".into(),
            };
            self.emit(e)?;
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
            bf16_weights: false,
        };
        let print = self.opts.print_sample;
        if print {
            println!("--- sample (temperature 0.8, top-k 50) ---");
            print!("{}", opts.prompt);
        }
        let mut out = |s: &str| {
            if print {
                use std::io::Write;
                print!("{s}");
                let _ = std::io::stdout().flush();
            }
        };
        let g = generate(
            &self.model,
            &self.params,
            self.kernels.as_ref(),
            tok,
            &opts,
            &mut out,
        )?;
        if print {
            println!("\n---");
        }
        let text = format!("{}{}", opts.prompt, g.text);
        self.emit(Event::Sample {
            step: self.step,
            prompt: opts.prompt.clone(),
            text: text.clone(),
        })?;
        Ok(Some(text))
    }
}
