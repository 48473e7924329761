//! Full training-step benchmark: forward, loss, backward, clipping and AdamW on random tokens,
//! with a per-kernel time breakdown.

use std::time::Instant;

use serde::Serialize;

use crate::backend::Kernels;
use crate::error::Result;
use crate::model::timing::BreakdownEntry;
use crate::model::{ModelConfig, Transformer};
use crate::optim::{AdamW, AdamWConfig, update_scale};
use crate::util::rng::Rng;

/// Results of `bench train`.
#[derive(Debug, Clone, Serialize)]
pub struct TrainBench {
    pub model: String,
    pub params: usize,
    pub batch: usize,
    pub seq: usize,
    pub precision: String,
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
}

#[allow(clippy::too_many_arguments)]
/// Runs `steps` measured training steps (after one warm-up step) of a randomly initialised
/// model on random tokens.
pub fn run(
    kernels: &dyn Kernels,
    name: &str,
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
    steps: usize,
    precision: &str,
    peak_gflops: f64,
) -> Result<TrainBench> {
    let model = Transformer::new(cfg.clone());
    let mut params = model.layout.init(cfg.n_layers, 1);
    let mut grads = vec![0.0f32; params.len()];
    let mut opt = AdamW::new(AdamWConfig::default(), &model.layout);
    let mut acts = model.activations(batch, seq);
    let mut rng = Rng::new(7);
    let n = batch * seq;
    let mut times = Vec::with_capacity(steps);
    for step in 0..=steps {
        let window: Vec<u32> = (0..n + batch)
            .map(|_| rng.below(cfg.vocab_size as u64) as u32)
            .collect();
        let mut inputs = Vec::with_capacity(n);
        let mut targets = Vec::with_capacity(n);
        for b in 0..batch {
            let w = &window[b * (seq + 1)..(b + 1) * (seq + 1)];
            inputs.extend_from_slice(&w[..seq]);
            targets.extend_from_slice(&w[1..]);
        }
        if step == 1 {
            acts.timings.reset();
        }
        let t0 = Instant::now();
        grads.fill(0.0);
        model.forward_backward(
            kernels, &params, &mut grads, &mut acts, &inputs, &targets, 1.0,
        )?;
        let t_opt = Instant::now();
        let u = update_scale(&grads, 1, 1.0);
        opt.step(&mut params, &grads, 3e-4, u.factor);
        acts.timings
            .add(crate::model::timing::Section::Optimizer, t_opt);
        if step > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let flops = cfg.train_flops(batch, seq);
    let gflops = flops / median / 1e9;
    let total_step: f64 = times.iter().sum();
    let accounted = acts.timings.total();
    let mut breakdown: Vec<BreakdownEntry> = acts
        .timings
        .entries()
        .into_iter()
        .map(|(s, secs)| BreakdownEntry {
            section: s.to_string(),
            ms: secs / steps as f64 * 1e3,
            percent: 100.0 * secs / total_step,
        })
        .collect();
    breakdown.push(BreakdownEntry {
        section: "other (zeroing, data, untimed)".into(),
        ms: (total_step - accounted).max(0.0) / steps as f64 * 1e3,
        percent: 100.0 * (total_step - accounted).max(0.0) / total_step,
    });
    Ok(TrainBench {
        model: name.to_string(),
        params: params.len(),
        batch,
        seq,
        precision: precision.to_string(),
        threads: rayon::current_num_threads(),
        steps,
        median_ms: median * 1e3,
        min_ms: sorted[0] * 1e3,
        max_ms: sorted[sorted.len() - 1] * 1e3,
        tokens_per_s: n as f64 / median,
        flops_per_step: flops,
        flop_formula: "6 x matmul params (classifier included) x tokens + 12 x layers x heads x seq^2 x head_dim x batch".into(),
        gflops,
        peak_gflops,
        mfu: gflops / peak_gflops,
        peak_rss_bytes: crate::util::mem::peak_rss_bytes(),
        breakdown,
    })
}
