//! The settings of one invocation of the trainer that do not change what is computed.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use super::distributed::Collective;
use super::resolve::ResolveRequest;
use super::resume::GivenFlags;
use crate::data::builtin;
use crate::run::RunDir;
use crate::telemetry::{ConsoleMode, EventSink};

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
    /// How the ranks' sums are cut and timed (no effect on one process).
    pub comm: CommOptions,
}

/// How a data-parallel job's sums run: neither changes the numbers with 2 ranks (with more,
/// the bucket size may change the summation order MPI picks, in the last bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommOptions {
    /// Sum each bucket of gradients while the backward pass computes the next ones (else all
    /// after it).
    pub overlap: bool,
    /// Largest bucket, in f32 values.
    pub bucket_values: usize,
}

impl Default for CommOptions {
    fn default() -> Self {
        CommOptions {
            overlap: true,
            bucket_values: super::grad_sync::DEFAULT_BUCKET_VALUES,
        }
    }
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
            comm: CommOptions::default(),
        }
    }
}

/// Physical cores (hyper-threads share FMA units and slow dense math down).
pub fn default_threads() -> usize {
    num_cpus::get_physical().max(1)
}

impl RunOptions {
    /// What resolving the run reads of these options.
    pub fn resolve_request<'a>(
        &'a self,
        folder: &'a RunDir,
        killed_while_starting: bool,
    ) -> ResolveRequest<'a> {
        ResolveRequest {
            folder,
            resume: self.resume,
            given: &self.given,
            requested_model: self.requested_model.as_deref(),
            cache_root: &self.cache_root,
            cap_seq_to_model: self.cap_seq_to_model,
            killed_while_starting,
        }
    }
}
