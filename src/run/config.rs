//! The training configuration (saved in the run directory and in every checkpoint) and the
//! loss-scaling policy it names.

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendKind, Precision};
use crate::error::{Error, Result};

/// The loss-scaling policy of a run (`--loss-scale`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LossScale {
    /// Dynamic on fp16 backends (`ane-sim`), none on the CPU.
    #[default]
    Auto,
    /// No scaling (the f32 and bf16 CPU paths need none).
    None,
    /// One fixed scale; a non-finite gradient stops the run.
    Static { scale: f64 },
    /// Starts at `scale`; an overflow skips the update and halves it; `growth_interval`
    /// clean updates in a row double it.
    Dynamic { scale: f64, growth_interval: u64 },
}

/// Dynamic scaling's defaults: the original's static scale to start from, and PyTorch's
/// growth and back-off factors (2 and 1/2) with a shorter growth interval.
pub const DEFAULT_SCALE: f64 = 256.0;
pub const DEFAULT_GROWTH_INTERVAL: u64 = 200;
impl std::str::FromStr for LossScale {
    type Err = String;

    /// `auto`, `none`, `static`, `static:S`, `dynamic`, `dynamic:S`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (kind, value) = match s.split_once(':') {
            Some((k, v)) => (k, Some(v)),
            None => (s, None),
        };
        let scale = match value {
            None => DEFAULT_SCALE,
            Some(v) => match v.parse::<f64>() {
                Ok(x) if x > 0.0 && x.is_finite() => x,
                _ => return Err(format!("loss scale '{v}' must be a positive number")),
            },
        };
        match (kind, value) {
            ("auto", None) => Ok(LossScale::Auto),
            ("none", None) => Ok(LossScale::None),
            ("static", _) => Ok(LossScale::Static { scale }),
            ("dynamic", _) => Ok(LossScale::Dynamic {
                scale,
                growth_interval: DEFAULT_GROWTH_INTERVAL,
            }),
            _ => Err(format!(
                "'{s}': expected auto, none, static[:SCALE] or dynamic[:SCALE]"
            )),
        }
    }
}

impl LossScale {
    /// The policy for kernels that do (`needs_scaling`, fp16 kernels: see
    /// `Kernels::needs_loss_scaling`) or do not need loss scaling (`Auto` resolved).
    pub fn resolve(self, needs_scaling: bool) -> LossScale {
        match self {
            LossScale::Auto if needs_scaling => LossScale::Dynamic {
                scale: DEFAULT_SCALE,
                growth_interval: DEFAULT_GROWTH_INTERVAL,
            },
            LossScale::Auto => LossScale::None,
            p => p,
        }
    }
}

/// Everything that defines a training run's numerics and data. Runtime settings that do not
/// change the result (threads, console output) live in `RunOptions` instead.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TrainConfig {
    /// Preset name or path of a `config.json`.
    pub model: String,
    /// Start from the weights of this model file or folder (Hugging Face, llama2.c, GGUF or
    /// handgrad checkpoint) instead of a fresh initialisation; its config replaces `model`.
    pub init_from: Option<String>,
    /// `builtin`, a token file, or a folder of token files.
    pub data: String,
    /// Tokenizer file; the built-in data brings its own.
    pub tokenizer: Option<String>,
    /// Optimizer updates in the whole run (the schedule spans these).
    pub steps: usize,
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Micro-batches per optimizer update (gradient accumulation).
    pub accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate as a fraction of the peak (cosine floor).
    pub min_lr_ratio: f64,
    /// Linear warmup updates.
    pub warmup: usize,
    /// AdamW decoupled weight decay (matrices and embeddings only).
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    /// Global gradient-norm clip (0 disables).
    pub clip: f64,
    /// Seed of initialisation, data sampling and the final sample.
    pub seed: u64,
    /// Evaluate every this many updates (0: only at the end).
    pub eval_every: usize,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
    /// Save `checkpoints/latest` every this many updates (0: only at the end).
    pub save_every: usize,
    /// Restrict the classifier to token ids present in the data.
    pub vocab_compaction: bool,
    /// Which backend computes the kernels.
    pub backend: BackendKind,
    /// Matmul precision: `fp32`, or `bf16` (bf16 products, f32 accumulation; f32 master
    /// weights, optimizer, norms, softmax and residual stream).
    pub precision: Precision,
    /// Loss scaling (`auto`: dynamic on fp16 backends, none on the CPU).
    pub loss_scale: LossScale,
    /// Without dynamic loss scaling: non-finite updates in a row (each skipped) that stop the
    /// run.
    pub max_bad_updates: usize,
    /// Fraction of a single data file held out for validation.
    pub val_fraction: f64,
    /// Prompt of the sample printed at the end.
    pub sample_prompt: String,
    /// Tokens of the sample printed at the end (0: no sample).
    pub sample_tokens: usize,
    /// Data-parallel ranks (processes) the run trains on: an update sees `batch x accum x
    /// ranks` sequences.
    pub ranks: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: "small".into(),
            init_from: None,
            data: "builtin".into(),
            tokenizer: None,
            steps: 1000,
            batch: 16,
            seq: 128,
            accum: 1,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup: 50,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            adam_eps: 1e-8,
            clip: 1.0,
            seed: 1337,
            eval_every: 100,
            eval_batches: 8,
            save_every: 200,
            vocab_compaction: false,
            backend: BackendKind::default(),
            precision: Precision::Fp32,
            loss_scale: LossScale::Auto,
            max_bad_updates: 3,
            val_fraction: 0.05,
            sample_prompt: "Once upon a time".into(),
            sample_tokens: 160,
            ranks: 1,
        }
    }
}

impl TrainConfig {
    /// Rejects values that cannot work, naming the flag.
    pub fn validate(&self) -> Result<()> {
        let pos = |name: &str, v: usize| {
            if v == 0 {
                Err(Error::invalid(format!("--{name} must be at least 1")))
            } else {
                Ok(())
            }
        };
        pos("steps", self.steps)?;
        pos("batch", self.batch)?;
        pos("seq", self.seq)?;
        pos("accum", self.accum)?;
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::invalid(format!(
                "--lr must be positive, got {}",
                self.lr
            )));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(Error::invalid(format!(
                "--min-lr-ratio must be in [0, 1], got {}",
                self.min_lr_ratio
            )));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::invalid(format!(
                    "--{name} must be in [0, 1), got {b}"
                )));
            }
        }
        if !(self.weight_decay >= 0.0 && self.clip >= 0.0 && self.adam_eps > 0.0) {
            return Err(Error::invalid(
                "--weight-decay and --clip must be >= 0, and the Adam epsilon > 0",
            ));
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return Err(Error::invalid(format!(
                "--val-fraction must be in [0, 1), got {}",
                self.val_fraction
            )));
        }
        Ok(())
    }

    /// The backend and precision.
    pub fn backend(&self) -> Backend {
        Backend::new(self.backend, self.precision)
    }

    /// Tokens consumed by one optimizer update (by all ranks together).
    pub fn tokens_per_update(&self) -> usize {
        self.batch * self.seq * self.accum * self.ranks.max(1)
    }
}
