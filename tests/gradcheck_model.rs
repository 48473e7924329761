//! Finite-difference gradient checks of the whole model (forward + backward through every
//! layer) on the `tiny` preset and variants: both RoPE conventions, GQA, Qwen3 q/k norm, tied
//! and untied classifiers, a compacted vocabulary, and random norm gains (never 1).

mod common;

use common::{GradReport, check_gradient, randn};
use handgrad::backend::CpuKernels;
use handgrad::backend::{Kernels, NormSaved};
use handgrad::model::params::TensorKind;
use handgrad::model::{Architecture, Batch, ModelConfig, RopeStyle, Transformer, VocabCompaction};

fn random_params(model: &Transformer, seed: u64) -> Vec<f32> {
    let mut p = vec![0.0f32; model.layout.total()];
    for (i, t) in model.layout.tensors.iter().enumerate() {
        let s = seed * 1000 + i as u64;
        let v = match t.kind {
            TensorKind::NormGain => randn(t.len(), s, 1.0, 0.3),
            TensorKind::Embedding | TensorKind::Classifier => randn(t.len(), s, 0.0, 0.5),
            _ => randn(t.len(), s, 0.0, 0.3),
        };
        p[t.range()].copy_from_slice(&v);
    }
    p
}

fn gradcheck(model: &Transformer, kernels: &dyn Kernels, seed: u64) -> GradReport {
    let (batch, seq) = (2, 5);
    let mut params = random_params(model, seed);
    let vocab = model.cfg.vocab_size as u64;
    let mut rng = handgrad::util::rng::Rng::new(seed);
    let allowed: Vec<u32> = match &model.compaction {
        Some(c) => c.kept.clone(),
        None => (0..vocab as u32).collect(),
    };
    let inputs: Vec<u32> = (0..batch * seq).map(|_| rng.below(vocab) as u32).collect();
    let targets: Vec<u32> = (0..batch * seq).map(|_| *rng.pick(&allowed)).collect();
    let mut acts = model.activations(kernels, batch, seq);
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
    };
    let mut grads = vec![0.0f32; params.len()];
    model
        .forward_backward(kernels, &params, &mut grads, &mut acts, batch, 1.0)
        .unwrap();
    let mut total = GradReport::default();
    for t in &model.layout.tensors {
        let mut loss = |p: &[f32]| model.loss(kernels, p, &mut acts, batch).unwrap();
        let r = check_gradient(
            &t.name,
            &mut params,
            &grads,
            &t.range().collect::<Vec<_>>(),
            1e-2,
            &mut loss,
        );
        total.checked += r.checked;
        total.worst = total.worst.max(r.worst);
        total.failures.extend(r.failures);
    }
    total
}

fn assert_passes(label: &str, model: &Transformer) {
    let r = gradcheck(model, &CpuKernels, 3);
    assert_eq!(r.checked, model.layout.total());
    eprintln!(
        "{label}: {} entries checked, worst error {:.3} of the tolerance",
        r.checked, r.worst
    );
    assert!(
        r.failures.is_empty(),
        "{label}: {} of {} gradient entries wrong (worst {:.2}):\n{}",
        r.failures.len(),
        r.checked,
        r.worst,
        r.failures
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn tiny() -> ModelConfig {
    ModelConfig::preset("tiny").unwrap()
}

#[test]
fn tiny_llama_rotate_half_gqa_tied() {
    let cfg = tiny();
    assert!(cfg.n_kv_heads < cfg.n_heads && cfg.tie_embeddings);
    assert_passes("tiny", &Transformer::new(cfg));
}

#[test]
fn tiny_llama_interleaved_untied() {
    let mut cfg = tiny();
    cfg.rope_style = RopeStyle::Interleaved;
    cfg.tie_embeddings = false;
    assert_passes("interleaved/untied", &Transformer::new(cfg));
}

#[test]
fn tiny_qwen3_qk_norm_wide_heads_untied() {
    let mut cfg = tiny();
    cfg.arch = Architecture::Qwen3;
    cfg.head_dim = 6; // != dim / heads = 4
    cfg.tie_embeddings = false;
    cfg.norm_eps = 1e-6;
    cfg.rope_theta = 1e6;
    assert_passes("qwen3", &Transformer::new(cfg));
}

#[test]
fn tiny_qwen3_interleaved_tied() {
    let mut cfg = tiny();
    cfg.arch = Architecture::Qwen3;
    cfg.rope_style = RopeStyle::Interleaved;
    assert_passes("qwen3/interleaved", &Transformer::new(cfg));
}

#[test]
fn tiny_with_compacted_vocabulary() {
    for tied in [true, false] {
        let mut cfg = tiny();
        cfg.tie_embeddings = tied;
        let mut model = Transformer::new(cfg);
        let kept: Vec<u32> = (0..64).filter(|i| i % 3 != 1).collect();
        model.set_compaction(Some(VocabCompaction::from_kept(kept, 64)));
        assert_passes("compacted", &model);
    }
}

/// The original system's RMSNorm backward multiplied the whole input gradient by the gain.
/// With random gains the gradient check must catch it: this proves the check can fail.
struct OriginalRmsNormBug;

impl Kernels for OriginalRmsNormBug {
    fn rmsnorm_backward(
        &self,
        dx: &mut [f32],
        dw: &mut [f32],
        dy: &[f32],
        saved: NormSaved,
        d: usize,
        accumulate: bool,
    ) -> handgrad::Result<()> {
        let NormSaved { x, w, rstd } = saved;
        for (row, &r) in rstd.iter().enumerate() {
            let (xr, dyr) = (&x[row * d..(row + 1) * d], &dy[row * d..(row + 1) * d]);
            let dot: f32 = dyr.iter().zip(xr).map(|(a, b)| a * b).sum();
            for i in 0..d {
                let v = w[i] * r * (dyr[i] - xr[i] * r * r / d as f32 * dot);
                if accumulate {
                    dx[row * d + i] += v;
                } else {
                    dx[row * d + i] = v;
                }
                dw[i] += dyr[i] * xr[i] * r;
            }
        }
        Ok(())
    }
}

#[test]
fn the_check_catches_the_original_rmsnorm_backward_bug() {
    let model = Transformer::new(tiny());
    let r = gradcheck(&model, &OriginalRmsNormBug, 3);
    assert!(
        r.failures.len() > 100,
        "the buggy RMSNorm backward went unnoticed ({} failures)",
        r.failures.len()
    );
}

/// The backward pass reports where the gradients are complete (so that data-parallel ranks
/// can send them while it goes on): at the layout's ready points, in order, and nothing it
/// reported complete changes afterwards: tied and untied classifiers, Qwen3's q/k norms, a
/// compacted vocabulary.
#[test]
fn gradients_reported_complete_never_change_afterwards() {
    let mut qwen = tiny();
    qwen.arch = Architecture::Qwen3;
    qwen.tie_embeddings = false;
    let mut untied = tiny();
    untied.tie_embeddings = false;
    for (label, cfg, compact) in [
        ("tied", tiny(), false),
        ("untied", untied.clone(), false),
        ("qwen3", qwen, false),
        ("compacted", untied, true),
    ] {
        let mut model = Transformer::new(cfg);
        if compact {
            let kept: Vec<u32> = (0..model.cfg.vocab_size as u32).step_by(3).collect();
            model.set_compaction(Some(VocabCompaction::from_kept(kept, 64)));
        }
        let params = random_params(&model, 11);
        let (batch, seq) = (2, 5);
        let mut rng = handgrad::util::rng::Rng::new(5);
        let inputs: Vec<u32> = (0..batch * seq)
            .map(|_| rng.below(model.cfg.vocab_size as u64) as u32)
            .collect();
        let targets: Vec<u32> = match &model.compaction {
            Some(c) => (0..batch * seq).map(|_| *rng.pick(&c.kept)).collect(),
            None => inputs.iter().rev().copied().collect(),
        };
        let mut acts = model.activations(&CpuKernels, batch, seq);
        let mut grads = vec![0.0f32; params.len()];
        let mut reported: Vec<(usize, Vec<f32>)> = Vec::new();
        model
            .forward_backward_reporting(
                &CpuKernels,
                &params,
                &mut grads,
                &mut acts,
                Batch {
                    inputs: &inputs,
                    targets: &targets,
                },
                1.0,
                &mut |g: &[f32], from: usize| reported.push((from, g[from..].to_vec())),
            )
            .unwrap();
        let points: Vec<usize> = reported.iter().map(|(p, _)| *p).collect();
        assert_eq!(points, model.layout.backward_ready_points(), "{label}");
        for (from, snapshot) in &reported {
            assert!(
                snapshot == &grads[*from..],
                "{label}: gradients from {from} changed after they were reported complete"
            );
        }
        assert!(grads.iter().any(|&g| g != 0.0), "{label}");
    }
}
