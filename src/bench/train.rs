//! Full training-step benchmark: the trainer's own step ([`TrainStep`]: forward, loss,
//! backward, clipping and AdamW) on random tokens, with a per-block time breakdown.

use std::time::Instant;

use serde::Serialize;

use crate::backend::{Backend, BackendInfo};
use crate::error::Result;
use crate::model::timing::{BreakdownEntry, Section};
use crate::model::{
    Base, BaseFormat, FrozenModel, LoraConfig, LoraLayout, ModelConfig, Transformer,
};
use crate::optim::{AdamW, AdamWConfig};
use crate::train::{FrozenBase, StepComm, StepState, TrainStep};
use crate::util::rng::Rng;

/// Results of `bench train`.
#[derive(Debug, Clone, Serialize)]
pub struct TrainBench {
    pub model: String,
    /// The model's parameters.
    pub params: usize,
    /// The parameters the step trains: all of them, or a LoRA run's adapters.
    pub trained_params: usize,
    pub batch: usize,
    pub seq: usize,
    pub backend: BackendInfo,
    pub threads: usize,
    pub steps: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub tokens_per_s: f64,
    /// FLOPs of one step by the formula below.
    pub flops_per_step: f64,
    pub flop_formula: String,
    pub gflops: f64,
    /// Measured peak of this precision on this machine (GFLOP/s).
    pub peak_gflops: f64,
    /// `gflops / peak_gflops`.
    pub mfu: f64,
    pub peak_rss_bytes: Option<u64>,
    pub breakdown: Vec<BreakdownEntry>,
    /// What the backend said about its prepared kernels.
    pub warnings: Vec<String>,
    /// On an accelerator backend: the last measured step's kernel and staging time and the
    /// bytes written into the programs' surfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<crate::backend::AcceleratorStats>,
}

/// A model and a batch shape to time.
#[derive(Debug, Clone)]
pub struct TrainRun<'a> {
    pub name: &'a str,
    pub cfg: &'a ModelConfig,
    pub batch: usize,
    pub seq: usize,
    /// Measured steps (after one warm-up step).
    pub steps: usize,
    /// Train LoRA adapters of the (frozen) model instead of all its weights.
    pub lora: Option<LoraConfig>,
    /// How a LoRA step holds the frozen model.
    pub base_weights: BaseFormat,
}

/// Runs `steps` measured training steps (after one warm-up step) of a randomly initialised
/// model on random tokens. `peak_gflops` is reported with the result (MFU).
pub fn run(backend: &Backend, r: &TrainRun, peak_gflops: f64) -> Result<TrainBench> {
    let (cfg, batch, seq, steps) = (r.cfg, r.batch, r.seq, r.steps.max(1));
    let model = Transformer::new(cfg.clone());
    let mut kernels = backend.kernels()?;
    kernels.prepare(&model.step_shape(batch, seq))?;
    let warnings = kernels.warnings();
    let params = model.layout.init(cfg.n_layers, 1);
    let lora = match &r.lora {
        Some(l) => Some(LoraLayout::new(cfg, l.clone())?),
        None => None,
    };
    // A LoRA step's frozen model in the format asked; its f32 copy is dropped before the
    // activations are allocated, as in a run.
    let (params, compact) = match (&lora, r.base_weights) {
        (Some(_), f) if f != BaseFormat::F32 => {
            let m = FrozenModel::new(&model.layout, &params, f);
            drop(params);
            (Vec::new(), Some(m))
        }
        _ => (params, None),
    };
    let (mut state, mut acts, base) = match &lora {
        None => {
            let opt = AdamW::new(AdamWConfig::default(), &model.layout);
            let acts = model.activations(kernels.as_ref(), batch, seq);
            (StepState::new(params, opt, batch * seq), acts, Vec::new())
        }
        Some(l) => {
            let opt = AdamW::for_tensors(AdamWConfig::default(), &l.tensors, l.total());
            let acts = model.activations_adapted(kernels.as_ref(), l, batch, seq);
            (StepState::new(l.init(1), opt, batch * seq), acts, params)
        }
    };
    let step = TrainStep {
        frozen: lora.as_ref().map(|l| FrozenBase {
            params: match &compact {
                Some(m) => Base::Compact(m),
                None => Base::F32(&base),
            },
            lora: l,
            dropout_seed: 1,
        }),
        model: &model,
        kernels: kernels.as_ref(),
        accum: 1,
        clip: 1.0,
        loss_scale: 1.0,
        comm: StepComm::Alone,
    };
    let mut rng = Rng::new(7);
    let vocab = cfg.vocab_size as u64;
    let mut random_batch = |inputs: &mut [u32], targets: &mut [u32]| {
        for (i, t) in inputs.iter_mut().zip(targets.iter_mut()) {
            *i = rng.below(vocab) as u32;
            *t = rng.below(vocab) as u32;
        }
    };
    let mut times = Vec::with_capacity(steps);
    let mut accelerator = None;
    for s in 0..=steps {
        if s == 1 {
            acts.timings.reset();
        }
        let t0 = Instant::now();
        let stats = step.run(&mut state, &mut acts, &mut random_batch, 3e-4)?;
        if s > 0 {
            times.push(t0.elapsed().as_secs_f64());
            accelerator = stats.accelerator;
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    // A frozen model computes no weight gradients: 4 instead of 6 FLOPs per matmul parameter
    // and token (the adapters' rank-r products are left out).
    let flops = match &lora {
        None => cfg.train_flops(batch, seq),
        Some(_) => {
            cfg.train_flops(batch, seq) - 2.0 * cfg.matmul_params() as f64 * (batch * seq) as f64
        }
    };
    let gflops = flops / median / 1e9;
    let total_step: f64 = times.iter().sum();
    let accounted = acts.timings.total();
    let entry = |section: &str, label: &str, secs: f64| BreakdownEntry {
        section: section.into(),
        label: label.into(),
        ms: secs / steps as f64 * 1e3,
        percent: 100.0 * secs / total_step,
    };
    let mut breakdown: Vec<BreakdownEntry> = Section::ALL
        .iter()
        .map(|&s| entry(s.name(), s.label(), acts.timings.get(s)))
        .collect();
    let other = (total_step - accounted).max(0.0);
    breakdown.push(entry("other", "other (zeroing, data, untimed)", other));
    Ok(TrainBench {
        model: r.name.to_string(),
        params: model.layout.total(),
        trained_params: state.params.len(),
        batch,
        seq,
        backend: {
            let mut info = backend.info();
            info.kernels = kernels.placement();
            info
        },
        threads: rayon::current_num_threads(),
        steps,
        median_ms: median * 1e3,
        min_ms: sorted[0] * 1e3,
        max_ms: sorted[sorted.len() - 1] * 1e3,
        tokens_per_s: (batch * seq) as f64 / median,
        flops_per_step: flops,
        flop_formula: match &lora {
            None => "6 x matmul params (classifier included) x tokens + 12 x layers x heads x seq^2 x head_dim x batch".into(),
            Some(l) => format!(
                "LoRA rank {} on {} ({} trainable, {:?} base): 4 x matmul params x tokens + 12 x layers x heads x seq^2 x head_dim x batch",
                l.cfg.rank,
                l.cfg.targets.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(","),
                l.total(),
                r.base_weights
            ),
        },
        gflops,
        peak_gflops,
        mfu: gflops / peak_gflops,
        peak_rss_bytes: crate::util::mem::peak_rss_bytes(),
        breakdown,
        warnings,
        accelerator,
    })
}
