//! Typed training events. They are the interface between the trainer and everything that shows
//! or records progress; their JSON form (one object per line in `events.jsonl`) is documented in
//! `docs/events.md` and is stable for scripts.

use serde::{Deserialize, Serialize};

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

/// One event of a training run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The run (or a resumed part of it) begins.
    RunStart {
        run_dir: String,
        model: serde_json::Value,
        train: serde_json::Value,
        params: ParamSummary,
        data: DataSummary,
        tokenizer: String,
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
    },
    /// One optimizer update finished.
    Step {
        /// Updates completed (1-based).
        step: u64,
        total_steps: u64,
        /// Mean training loss over the update's micro-batches.
        loss: f64,
        /// `full` or `compacted` (over the compacted vocabulary only).
        loss_kind: String,
        lr: f64,
        /// Global gradient norm before clipping.
        grad_norm: f64,
        clipped: bool,
        /// Wall time of the whole update (forward, backward, optimizer).
        ms: f64,
        tokens_per_s: f64,
        tokens_seen: u64,
    },
    /// Validation loss on the fixed validation windows.
    Eval {
        step: u64,
        val_loss: f64,
        loss_kind: String,
        best_val_loss: f64,
        ms: f64,
    },
    /// A checkpoint was written.
    Checkpoint {
        step: u64,
        /// `latest`, `best`, `final` or `interrupt`.
        kind: String,
        path: String,
        bytes: u64,
        ms: f64,
    },
    /// A generated text sample.
    Sample {
        step: u64,
        prompt: String,
        text: String,
    },
    /// Something the user should know that does not stop the run.
    Warning { message: String },
    /// The run ends, with an efficiency report.
    RunEnd {
        step: u64,
        /// `completed`, `interrupted` or `stopped` (--stop-after).
        reason: String,
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

/// An event with its time, as written to `events.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// Unix time in seconds.
    pub time: f64,
    #[serde(flatten)]
    pub event: Event,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
