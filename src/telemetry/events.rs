//! Typed training events. They are the interface between the trainer and everything that shows
//! or records progress; their JSON form (one [`Record`] per line in `events.jsonl`) is
//! documented in `docs/events.md` and is stable for scripts.

use serde::{Deserialize, Serialize};

use crate::backend::BackendInfo;
use crate::model::ModelConfig;
use crate::model::timing::KernelTime;
use crate::run::TrainConfig;

/// Version of the record format. Fields are only ever added within a version.
pub const SCHEMA_VERSION: u32 = 1;

/// Parameter counts as reported in `run_start`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ParamSummary {
    pub total: usize,
    pub embedding: usize,
    pub non_embedding: usize,
}

/// Data as reported in `run_start`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataSummary {
    pub source: String,
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub split: String,
}

/// What a loss covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// The full vocabulary.
    Full,
    /// Only the token ids kept by vocabulary compaction (lower than a full loss would be).
    Compacted,
}

/// Why a checkpoint was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// The periodic `checkpoints/latest` (`--save-every`, `--stop-after`).
    Latest,
    /// `checkpoints/best`: the lowest validation loss so far.
    Best,
    /// `checkpoints/latest` at the end of the run.
    Final,
    /// `checkpoints/latest` after Ctrl-C.
    Interrupt,
}

impl CheckpointKind {
    /// The name used in messages and JSON.
    pub fn name(self) -> &'static str {
        match self {
            CheckpointKind::Latest => "latest",
            CheckpointKind::Best => "best",
            CheckpointKind::Final => "final",
            CheckpointKind::Interrupt => "interrupt",
        }
    }
}

/// How a run (or this invocation of it) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// Every update of `--steps` is done.
    Completed,
    /// Ctrl-C: saved and stopped.
    Interrupted,
    /// `--stop-after` updates of this invocation are done.
    Stopped,
}

impl EndReason {
    /// The name used in messages and JSON.
    pub fn name(self) -> &'static str {
        match self {
            EndReason::Completed => "completed",
            EndReason::Interrupted => "interrupted",
            EndReason::Stopped => "stopped",
        }
    }
}

/// One event of a training run.
// A few events per update: the size of the rare `run_start` does not matter, and boxing it
// would make every match on it clumsier.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The run (or a resumed part of it) begins.
    RunStart {
        run_dir: String,
        model: ModelConfig,
        train: TrainConfig,
        params: ParamSummary,
        data: DataSummary,
        tokenizer: String,
        /// The backend and precision of the kernels.
        backend: BackendInfo,
        /// Tokens consumed by one optimizer update (batch x seq x accum).
        tokens_per_update: usize,
        /// FLOPs of one optimizer update (see DESIGN.md section 4).
        flops_per_update: f64,
        activation_bytes: usize,
        threads: usize,
        /// Rows of the classifier when vocabulary compaction is on.
        vocab_compacted_to: Option<usize>,
        /// The step a resumed run continues from.
        resumed_from_step: Option<u64>,
        /// Settings chosen for the user (e.g. a sequence length capped by the model).
        #[serde(default)]
        notes: Vec<String>,
        /// Where power readings come from (absent: the machine reports none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        power_source: Option<String>,
    },
    /// One optimizer update finished.
    Step {
        /// Updates completed (1-based).
        step: u64,
        total_steps: u64,
        /// Mean training loss over the update's micro-batches (`null` in JSON when not finite).
        #[serde(deserialize_with = "nullable_f64")]
        loss: f64,
        loss_kind: LossKind,
        lr: f64,
        /// Global gradient norm before clipping (`null` in JSON when not finite: an overflow).
        #[serde(deserialize_with = "nullable_f64")]
        grad_norm: f64,
        clipped: bool,
        /// Wall time of the whole update (forward, backward, optimizer).
        ms: f64,
        tokens_per_s: f64,
        tokens_seen: u64,
        /// Time per kernel block of this update.
        #[serde(default)]
        kernels: Vec<KernelTime>,
        /// On an accelerator backend (ane, ane-sim): the time of its programs, of staging
        /// their surfaces, and of the CPU's work (the rest of `ms`, the optimizer included),
        /// and the bytes written into its surfaces.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        accelerator: Option<AcceleratorStep>,
        /// Resident memory of the process (every few updates; absent otherwise).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rss_bytes: Option<u64>,
        /// The loss scale of this update (absent when the run does not scale its loss).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        loss_scale: Option<f64>,
        /// The gradient overflowed: the update was skipped and the loss scale halved.
        #[serde(default)]
        skipped: bool,
        /// CPU time of the process over wall time during the update, in percent (100 per
        /// busy core).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cpu_percent: Option<f64>,
        /// Energy of the update and per token, and the mean power, where the machine reports
        /// them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        energy_j: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        energy_j_per_token: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        power_w: Option<f64>,
    },
    /// Validation loss on the fixed validation windows.
    Eval {
        step: u64,
        val_loss: f64,
        loss_kind: LossKind,
        best_val_loss: f64,
        ms: f64,
    },
    /// A checkpoint was written.
    Checkpoint {
        step: u64,
        kind: CheckpointKind,
        path: String,
        bytes: u64,
        ms: f64,
    },
    /// A generated text sample.
    Sample {
        step: u64,
        prompt: String,
        /// The prompt and its continuation.
        text: String,
    },
    /// Progress worth telling that is not part of training (building the built-in data).
    Info { message: String },
    /// Something the user should know that does not stop the run.
    Warning { message: String },
    /// The run stopped on an error (the last checkpoint is intact).
    RunError { step: u64, message: String },
    /// The process restarts itself to continue the run from its last checkpoint (the Neural
    /// Engine compiler's per-process budget is spent).
    Restart {
        step: u64,
        reason: String,
        compiles_used: usize,
        compile_budget: usize,
    },
    /// The run ends, with an efficiency report.
    RunEnd {
        step: u64,
        reason: EndReason,
        wall_s: f64,
        updates: u64,
        mean_ms_per_update: f64,
        median_ms_per_update: f64,
        tokens_per_s: f64,
        gflops_per_s: f64,
        final_loss: Option<f64>,
        best_val_loss: Option<f64>,
        /// Peak resident memory of the process, where the platform reports it.
        peak_rss_bytes: Option<u64>,
    },
}

/// Where an update's time went on an accelerator backend.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AcceleratorStep {
    /// The accelerator's programs: evaluations on the device (or in the simulator).
    pub kernel_ms: f64,
    /// Writing their input surfaces and reading their outputs (f32 <-> fp16 packing).
    pub staging_ms: f64,
    /// Everything else, on the CPU: embedding, norms, SwiGLU and RoPE backward, weight
    /// gradients, classifier and loss, AdamW (the update's `ms` minus the two above).
    pub cpu_ms: f64,
    /// Bytes written into the programs' input surfaces during the update.
    pub bytes_staged: u64,
    /// Of which weights (each layer's, once per optimizer update).
    pub weight_bytes_staged: u64,
    /// Program evaluations.
    pub calls: u64,
}

/// An event with its time and format version, as sinks receive it and `events.jsonl` holds it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// Version of this format ([`SCHEMA_VERSION`]).
    #[serde(default = "default_schema")]
    pub schema: u32,
    /// Unix time in seconds.
    pub time: f64,
    #[serde(flatten)]
    pub event: Event,
}

fn default_schema() -> u32 {
    SCHEMA_VERSION
}

impl Record {
    /// An event stamped now.
    pub fn now(event: Event) -> Self {
        Record {
            schema: SCHEMA_VERSION,
            time: unix_now(),
            event,
        }
    }
}

/// Reads a float that JSON wrote as `null` because it was not finite (serde_json writes NaN
/// and infinities as `null`) back as NaN.
fn nullable_f64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
