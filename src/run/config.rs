//! The training configuration (saved in the run directory and in every checkpoint) and the
//! loss-scaling policy it names.

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendKind, Precision};
use crate::error::{Error, Result};
use crate::model::{BaseFormat, LoraConfig, LoraTarget};
use crate::train::diloco::OuterConfig;
use crate::train::distributed::{DistributedMode, GradComm};

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

/// Everything that defines a training run's numerics and data: saved as the run folder's
/// `train_config.json` and in every checkpoint, and declared once for the command line too
/// (`handgrad train` flattens it; `--config FILE` reads a saved one). Runtime settings that
/// do not change the result (threads, console output) live in `RunOptions` instead.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, clap::Args)]
#[serde(default)]
pub struct TrainConfig {
    /// Model: a preset (tiny, small, stories260k, stories15m, stories42m, stories110m,
    /// qwen3-0.6b) or a Hugging Face config.json. Presets take the tokenizer's vocabulary.
    #[arg(long, default_value_t = d().model, help_heading = "Model and data")]
    pub model: String,
    /// Fine-tune: start from this model's weights (Hugging Face folder or .safetensors,
    /// llama2.c .bin, GGUF, or handgrad checkpoint or run folder); its config replaces
    /// --model, and its tokenizer comes along when it has one.
    #[arg(long, conflicts_with = "model", help_heading = "Model and data")]
    pub init_from: Option<String>,
    /// Training data: `builtin` (generated children's stories with their own tokenizer), a
    /// token file (llama2.c uint16 or handgrad shard) or a folder of them.
    #[arg(long, default_value_t = d().data, help_heading = "Model and data")]
    pub data: String,
    /// Tokenizer file (tokenizer.json or llama2.c tokenizer.bin); by default the model's (with
    /// --init-from) or the one next to the data; the built-in data brings its own.
    #[arg(long, help_heading = "Model and data")]
    pub tokenizer: Option<String>,
    /// Optimizer updates in the whole run (the schedule spans these); on --resume, a new total.
    #[arg(long, default_value_t = d().steps, help_heading = "Schedule and batch")]
    pub steps: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = d().batch, help_heading = "Schedule and batch")]
    pub batch: usize,
    /// Tokens per sequence (the model's limit when that is smaller and --seq is not given).
    #[arg(long, default_value_t = d().seq, help_heading = "Schedule and batch")]
    pub seq: usize,
    /// Micro-batches accumulated per optimizer update.
    #[arg(long, default_value_t = d().accum, help_heading = "Schedule and batch")]
    pub accum: usize,
    /// Peak learning rate (after warmup).
    #[arg(long, default_value_t = d().lr, help_heading = "Schedule and batch")]
    pub lr: f64,
    /// Final learning rate of the cosine decay, as a fraction of --lr.
    #[arg(long, default_value_t = d().min_lr_ratio, help_heading = "Schedule and batch")]
    pub min_lr_ratio: f64,
    /// Updates of linear learning-rate warmup.
    #[arg(long, default_value_t = d().warmup, help_heading = "Schedule and batch")]
    pub warmup: usize,
    /// AdamW weight decay (matrices and embeddings; never norm gains).
    #[arg(long, default_value_t = d().weight_decay, help_heading = "Optimizer and numerics")]
    pub weight_decay: f64,
    /// AdamW beta1.
    #[arg(long, default_value_t = d().beta1, help_heading = "Optimizer and numerics")]
    pub beta1: f64,
    /// AdamW beta2.
    #[arg(long, default_value_t = d().beta2, help_heading = "Optimizer and numerics")]
    pub beta2: f64,
    /// AdamW epsilon (not a flag: PyTorch's default).
    #[arg(skip = d().adam_eps)]
    pub adam_eps: f64,
    /// Clip the global gradient norm to this value (0: no clipping).
    #[arg(long, default_value_t = d().clip, help_heading = "Optimizer and numerics")]
    pub clip: f64,
    /// Seed of initialisation, data order and the final sample.
    #[arg(long, default_value_t = d().seed, help_heading = "Optimizer and numerics")]
    pub seed: u64,
    /// Evaluate on the validation windows every N updates (0: only at the end).
    #[arg(long, default_value_t = d().eval_every, help_heading = "Evaluation, checkpoints and sample")]
    pub eval_every: usize,
    /// Validation batches per evaluation.
    #[arg(long, default_value_t = d().eval_batches, help_heading = "Evaluation, checkpoints and sample")]
    pub eval_batches: usize,
    /// Save checkpoints/latest every N updates (0: only at the end and on Ctrl-C).
    #[arg(long, default_value_t = d().save_every, help_heading = "Evaluation, checkpoints and sample")]
    pub save_every: usize,
    /// Restrict the classifier to token ids that occur in the data (faster for small corpora;
    /// the reported loss is then over that compacted vocabulary, not the full one).
    #[arg(long, help_heading = "Model and data")]
    pub vocab_compaction: bool,
    /// Which backend computes the kernels (`--backend`, declared with `--precision` in the
    /// command line's backend options, shared with `generate` and `bench`).
    #[arg(skip)]
    pub backend: BackendKind,
    /// Matmul precision: `fp32`, `bf16` (bf16 products, f32 accumulation; f32 master weights,
    /// optimizer, norms, softmax and residual stream) or `fp16` (the Neural Engine's).
    #[arg(skip)]
    pub precision: Precision,
    /// Loss scaling: auto (dynamic on fp16 backends such as ane-sim, none on the CPU), none,
    /// static[:SCALE] (a fixed factor), or dynamic[:SCALE] (start at SCALE, default 256; an
    /// overflowing update is skipped and the scale halved; 200 clean updates double it).
    #[arg(long, default_value = "auto", help_heading = "Optimizer and numerics")]
    pub loss_scale: LossScale,
    /// An update whose loss or gradient is not finite (NaN or infinite) is skipped, with a
    /// warning naming the first non-finite tensor; K such updates in a row stop the run (the
    /// last checkpoint is intact). With dynamic loss scaling the scale is lowered instead.
    #[arg(long, default_value_t = d().max_bad_updates, value_name = "K", help_heading = "Optimizer and numerics")]
    pub max_bad_updates: usize,
    /// Fraction of a single data file held out for validation.
    #[arg(long, default_value_t = d().val_fraction, help_heading = "Model and data")]
    pub val_fraction: f64,
    /// Prompt of the sample generated at the end.
    #[arg(long, default_value_t = d().sample_prompt, help_heading = "Evaluation, checkpoints and sample")]
    pub sample_prompt: String,
    /// Tokens of the sample generated at the end (0: none).
    #[arg(long, default_value_t = d().sample_tokens, help_heading = "Evaluation, checkpoints and sample")]
    pub sample_tokens: usize,
    /// The chat template of chat data (a Jinja file), when the model's tokenizer_config.json
    /// has none or another is wanted. Chat data is a .jsonl of {"messages": [...]} or
    /// {"prompt", "completion"} lines, or `handgrad prepare --chat`'s output.
    #[arg(long, value_name = "FILE", help_heading = "Model and data")]
    pub chat_template: Option<String>,
    /// Fine-tune LoRA adapters of rank R instead of every weight: the --init-from model stays
    /// frozen and only the adapters (`A [R, in]`, `B [out, R]` per adapted projection) train;
    /// they are saved as a PEFT adapter in the run folder's `adapter/`.
    #[arg(long, value_name = "R", help_heading = "LoRA fine-tuning")]
    pub lora_rank: Option<usize>,
    /// The adapters' scale numerator: each adds `(alpha / R) B A x` (default 2R).
    #[arg(
        long,
        value_name = "ALPHA",
        requires = "lora_rank",
        help_heading = "LoRA fine-tuning"
    )]
    pub lora_alpha: Option<f64>,
    /// Projections to adapt: comma-separated q,k,v,o,gate,up,down, or all-linear.
    #[arg(long, default_value_t = d().lora_targets, requires = "lora_rank", help_heading = "LoRA fine-tuning")]
    pub lora_targets: String,
    /// How the frozen model is held: f32 (as trained), bf16 (half the memory; its matrices
    /// rounded to 8 significant bits) or q8 (int8 in groups with f32 scales, about a quarter;
    /// the QLoRA idea). Its layers are expanded to f32 one at a time as a pass reaches them.
    #[arg(long, value_enum, default_value_t = BaseFormat::F32, requires = "lora_rank", help_heading = "LoRA fine-tuning")]
    pub base_weights: BaseFormat,
    /// Dropout on the adapters' input during training (0: none).
    #[arg(long, default_value_t = d().lora_dropout, requires = "lora_rank", help_heading = "LoRA fine-tuning")]
    pub lora_dropout: f64,
    /// Data-parallel ranks (processes) the run trains on: an update sees `batch x accum x
    /// ranks` sequences (not a flag: the job's rank count).
    #[arg(skip = d().ranks)]
    pub ranks: usize,
    /// What the ranks of an MPI job exchange: data-parallel (the gradients, every update: the
    /// same result as one process with the whole batch) or diloco (each rank trains on its own
    /// data for --sync-every updates, then one outer Nesterov step on the ranks' mean weight
    /// change: H times less communication, a different result).
    #[arg(long, value_enum, default_value_t = d().distributed_mode, help_heading = "Several machines")]
    pub distributed_mode: DistributedMode,
    /// DiLoCo: inner updates between two outer steps (H); the last update of a run is one too.
    #[arg(long, default_value_t = d().sync_every, value_name = "H", help_heading = "Several machines")]
    pub sync_every: usize,
    /// DiLoCo: learning rate of the outer step (1 with --outer-momentum 0: the ranks' mean).
    #[arg(long, default_value_t = d().outer_lr, help_heading = "Several machines")]
    pub outer_lr: f64,
    /// DiLoCo: Nesterov momentum of the outer step.
    #[arg(long, default_value_t = d().outer_momentum, help_heading = "Several machines")]
    pub outer_momentum: f64,
    /// How gradients (DiLoCo: weight changes) travel between ranks: f32, or bf16 (rounded to
    /// 8 significant bits for the transfer, summed in f32; half the bytes with 2 ranks).
    #[arg(long, value_enum, default_value_t = d().grad_comm, help_heading = "Several machines")]
    pub grad_comm: GradComm,
}

fn d() -> TrainConfig {
    TrainConfig::default()
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: "small".into(),
            init_from: None,
            data: super::BUILTIN_DATA.into(),
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
            chat_template: None,
            lora_rank: None,
            lora_alpha: None,
            lora_targets: "all-linear".into(),
            base_weights: BaseFormat::F32,
            lora_dropout: 0.0,
            ranks: 1,
            distributed_mode: DistributedMode::DataParallel,
            sync_every: 50,
            outer_lr: 0.7,
            outer_momentum: 0.9,
            grad_comm: GradComm::F32,
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
        if self.lora()?.is_some() && self.init_from.is_none() {
            return Err(Error::invalid(
                "--lora-rank adapts a pretrained model: name it with --init-from (a Hugging Face \
                 folder, .safetensors, GGUF, llama2.c .bin or a handgrad run)",
            ));
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return Err(Error::invalid(format!(
                "--val-fraction must be in [0, 1), got {}",
                self.val_fraction
            )));
        }
        if self.sync_every == 0 {
            return Err(Error::invalid("--sync-every must be at least 1"));
        }
        if !(self.outer_lr > 0.0 && self.outer_lr.is_finite()) {
            return Err(Error::invalid(format!(
                "--outer-lr must be positive, got {}",
                self.outer_lr
            )));
        }
        if !(0.0..1.0).contains(&self.outer_momentum) {
            return Err(Error::invalid(format!(
                "--outer-momentum must be in [0, 1), got {}",
                self.outer_momentum
            )));
        }
        if self.distributed_mode == DistributedMode::Diloco && self.lora_rank.is_some() {
            return Err(Error::invalid(
                "--distributed-mode diloco does not train LoRA adapters yet: use data-parallel",
            ));
        }
        Ok(())
    }

    /// DiLoCo's outer optimizer, when the run uses it.
    pub fn outer(&self) -> Option<OuterConfig> {
        (self.distributed_mode == DistributedMode::Diloco).then_some(OuterConfig {
            sync_every: self.sync_every,
            lr: self.outer_lr,
            momentum: self.outer_momentum,
        })
    }

    /// The LoRA adapters the run trains, if it trains adapters (`--lora-rank`).
    pub fn lora(&self) -> Result<Option<LoraConfig>> {
        let Some(rank) = self.lora_rank else {
            return Ok(None);
        };
        let lora = LoraConfig {
            rank,
            alpha: self.lora_alpha.unwrap_or(2.0 * rank as f64),
            targets: LoraTarget::parse_list(&self.lora_targets)?,
            dropout: self.lora_dropout,
        };
        lora.validate()?;
        Ok(Some(lora))
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
