//! LoRA adapters: finite-difference gradient checks of every adapter tensor through a whole
//! model (Llama and Qwen3 shapes, all seven projections or a subset, with dropout and with
//! masked targets), and the identities an adapter must keep: `B = 0` gives exactly the base
//! model's logits, and the merged weights `W + (alpha/r) B A` give the adapted model's logits.

mod common;

use common::{GradReport, check_gradient, randn};
use handgrad::backend::{CpuBf16Kernels, CpuKernels, IGNORE_TARGET, Kernels};
use handgrad::model::params::TensorKind;
use handgrad::model::{
    Adapters, Architecture, Base, Batch, LoraConfig, LoraLayout, LoraTarget, ModelConfig,
    Transformer,
};

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

/// Adapters with every value random (B nonzero, so every path carries gradient).
fn random_adapters(layout: &LoraLayout, seed: u64) -> Vec<f32> {
    randn(layout.total(), seed, 0.0, 0.3)
}

fn lora(targets: &[LoraTarget], dropout: f64) -> LoraConfig {
    LoraConfig {
        rank: 3,
        alpha: 6.0,
        targets: targets.to_vec(),
        dropout,
    }
}

fn qwen3() -> ModelConfig {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.arch = Architecture::Qwen3;
    cfg.head_dim = 6;
    cfg.tie_embeddings = false;
    cfg
}

struct Case {
    model: Transformer,
    base: Vec<f32>,
    layout: LoraLayout,
    inputs: Vec<u32>,
    targets: Vec<u32>,
}

fn case(cfg: ModelConfig, lora_cfg: LoraConfig, mask_first: usize, seed: u64) -> Case {
    let (batch, seq) = (2, 5);
    let model = Transformer::new(cfg);
    let base = random_params(&model, seed);
    let layout = LoraLayout::new(&model.cfg, lora_cfg).unwrap();
    let vocab = model.cfg.vocab_size as u64;
    let mut rng = handgrad::util::rng::Rng::new(seed);
    let inputs: Vec<u32> = (0..batch * seq).map(|_| rng.below(vocab) as u32).collect();
    let mut targets: Vec<u32> = (0..batch * seq).map(|_| rng.below(vocab) as u32).collect();
    for row in targets.chunks_mut(seq) {
        row[..mask_first].fill(IGNORE_TARGET);
    }
    Case {
        model,
        base,
        layout,
        inputs,
        targets,
    }
}

fn gradcheck(c: &Case, k: &dyn Kernels, seed: u64) -> GradReport {
    let mut ad = random_adapters(&c.layout, seed);
    let (batch, seq) = (2, 5);
    let mut acts = c.model.activations_adapted(k, &c.layout, batch, seq);
    let b = Batch {
        inputs: &c.inputs,
        targets: &c.targets,
    };
    let dropout_seed = Some(seed ^ 0x55);
    let mut grads = vec![0.0f32; ad.len()];
    let adapters = Adapters {
        layout: &c.layout,
        params: &ad,
        dropout_seed,
    };
    c.model
        .forward_backward_adapted(
            k,
            Base::F32(&c.base),
            &adapters,
            &mut grads,
            &mut acts,
            b,
            1.0,
        )
        .unwrap();
    let mut loss = |p: &[f32]| {
        let adapters = Adapters {
            layout: &c.layout,
            params: p,
            dropout_seed,
        };
        c.model
            .loss_adapted(k, Base::F32(&c.base), &adapters, &mut acts, b)
            .unwrap()
    };
    let all: Vec<usize> = (0..ad.len()).collect();
    check_gradient("adapters", &mut ad, &grads, &all, 1e-2, &mut loss)
}

fn assert_passes(label: &str, c: &Case) {
    let r = gradcheck(c, &CpuKernels, 5);
    assert_eq!(r.checked, c.layout.total());
    eprintln!(
        "{label}: {} adapter entries checked, worst error {:.3} of the tolerance",
        r.checked, r.worst
    );
    assert!(
        r.failures.is_empty(),
        "{label}: {} of {} adapter gradient entries wrong:\n{}",
        r.failures.len(),
        r.checked,
        r.failures[..r.failures.len().min(20)].join("\n")
    );
}

#[test]
fn llama_all_projections() {
    let c = case(
        ModelConfig::preset("tiny").unwrap(),
        lora(&LoraTarget::ALL, 0.0),
        0,
        1,
    );
    assert_passes("llama/all", &c);
}

#[test]
fn qwen3_all_projections_with_masked_prompt() {
    let c = case(qwen3(), lora(&LoraTarget::ALL, 0.0), 2, 2);
    assert_passes("qwen3/all/masked", &c);
}

#[test]
fn subset_of_projections_with_dropout() {
    let c = case(
        qwen3(),
        lora(&[LoraTarget::Q, LoraTarget::O, LoraTarget::Down], 0.3),
        1,
        3,
    );
    assert_passes("qwen3/q,o,down/dropout", &c);
    let c = case(
        ModelConfig::preset("tiny").unwrap(),
        lora(&LoraTarget::ALL, 0.2),
        0,
        4,
    );
    assert_passes("llama/all/dropout", &c);
}

/// A wrong adapter backward must fail the check: dropping the `1/(1-p)` of the dropout
/// backward's mask (a plausible slip) is emulated by checking gradients computed with one
/// dropout seed against losses drawn with another.
#[test]
fn the_check_can_fail() {
    let c = case(qwen3(), lora(&LoraTarget::ALL, 0.3), 0, 6);
    let k = CpuKernels;
    let mut ad = random_adapters(&c.layout, 6);
    let mut acts = c.model.activations_adapted(&k, &c.layout, 2, 5);
    let b = Batch {
        inputs: &c.inputs,
        targets: &c.targets,
    };
    let mut grads = vec![0.0f32; ad.len()];
    let adapters = Adapters {
        layout: &c.layout,
        params: &ad,
        dropout_seed: Some(1),
    };
    c.model
        .forward_backward_adapted(
            &k,
            Base::F32(&c.base),
            &adapters,
            &mut grads,
            &mut acts,
            b,
            1.0,
        )
        .unwrap();
    let mut loss = |p: &[f32]| {
        let adapters = Adapters {
            layout: &c.layout,
            params: p,
            dropout_seed: Some(2),
        };
        c.model
            .loss_adapted(&k, Base::F32(&c.base), &adapters, &mut acts, b)
            .unwrap()
    };
    let all: Vec<usize> = (0..ad.len()).collect();
    let r = check_gradient("adapters", &mut ad, &grads, &all, 1e-2, &mut loss);
    assert!(!r.failures.is_empty(), "a wrong gradient passed the check");
}

/// Masked targets: the loss is the mean over the counted targets only, equal to the loss of a
/// batch holding just those rows' terms.
#[test]
fn masked_targets_count_only_in_the_mean() {
    let c = case(qwen3(), lora(&LoraTarget::ALL, 0.0), 3, 7);
    let k = CpuKernels;
    let ad = random_adapters(&c.layout, 7);
    let adapters = Adapters {
        layout: &c.layout,
        params: &ad,
        dropout_seed: None,
    };
    let mut acts = c.model.activations_adapted(&k, &c.layout, 2, 5);
    let b = Batch {
        inputs: &c.inputs,
        targets: &c.targets,
    };
    let masked = c
        .model
        .loss_adapted(&k, Base::F32(&c.base), &adapters, &mut acts, b)
        .unwrap();
    // Per-row losses from the logits of the same forward pass.
    let v = c.model.cfg.vocab_size;
    let mut sum = 0.0;
    let mut count = 0;
    for (row, &t) in acts.logits.chunks(v).zip(&c.targets) {
        if t == IGNORE_TARGET {
            continue;
        }
        let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
        let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
        sum += m + z.ln() - row[t as usize] as f64;
        count += 1;
    }
    assert_eq!(count, 4);
    assert!(
        (masked - sum / count as f64).abs() < 1e-5,
        "{masked} vs {}",
        sum / 4.0
    );
}

fn logits_adapted(c: &Case, k: &dyn Kernels, ad: &[f32]) -> Vec<f32> {
    let adapters = Adapters {
        layout: &c.layout,
        params: ad,
        dropout_seed: None,
    };
    let mut acts = c.model.activations_adapted(k, &c.layout, 2, 5);
    c.model
        .forward_adapted(k, Base::F32(&c.base), &adapters, &mut acts, &c.inputs)
        .unwrap();
    acts.logits
}

fn logits(c: &Case, k: &dyn Kernels, params: &[f32]) -> Vec<f32> {
    let mut acts = c.model.activations(k, 2, 5);
    c.model.forward(k, params, &mut acts, &c.inputs).unwrap();
    acts.logits
}

#[test]
fn zero_b_gives_exactly_the_base_model() {
    for k in [&CpuKernels as &dyn Kernels, &CpuBf16Kernels] {
        let c = case(qwen3(), lora(&LoraTarget::ALL, 0.0), 0, 8);
        let fresh = c.layout.init(8);
        assert!(fresh.iter().any(|&x| x != 0.0));
        assert_eq!(logits_adapted(&c, k, &fresh), logits(&c, k, &c.base));
    }
}

/// Merging is the same function: logits of `W + (alpha/r) B A` equal the adapted model's, to
/// float32 rounding of a sum of products of size ~1 (a few units in the 7th digit).
#[test]
fn merged_weights_give_the_adapted_logits() {
    let c = case(
        ModelConfig::preset("tiny").unwrap(),
        lora(&LoraTarget::ALL, 0.0),
        0,
        9,
    );
    let ad = random_adapters(&c.layout, 9);
    let merged = c.layout.merge(&c.model.layout, &c.base, &ad);
    let a = logits_adapted(&c, &CpuKernels, &ad);
    let b = logits(&c, &CpuKernels, &merged);
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "merged logits differ by {worst}");
    // And the merge changed the weights (the adapters are not zero).
    assert_ne!(merged, c.base);
}

/// A compact frozen model (`--base-weights bf16|q8`) is the model it stands for: a pass over it,
/// expanded a layer and a block of classifier rows at a time, gives the loss and adapter
/// gradients of the f32 pass over its expansion. The vocabulary of 5000 rows makes the
/// classifier run in two blocks. Only the summation order of the classifier's input gradient
/// differs (blocks of rows), so the gradients agree to float32 rounding: 1e-5 of their norm.
#[test]
fn a_compact_frozen_model_is_the_model_it_stands_for() {
    use handgrad::model::{BaseFormat, FrozenModel};
    let mut cfg = qwen3();
    cfg.vocab_size = 5000;
    for (format, compacted) in [
        (BaseFormat::Bf16, false),
        (BaseFormat::Q8, false),
        (BaseFormat::Bf16, true),
    ] {
        let mut c = case(cfg.clone(), lora(&LoraTarget::ALL, 0.2), 1, 11);
        if compacted {
            let kept: Vec<u32> = (0..5000).filter(|i| i % 7 != 3).collect();
            c.model
                .set_compaction(Some(handgrad::model::VocabCompaction::from_kept(
                    kept, 5000,
                )));
            for t in c
                .targets
                .iter_mut()
                .filter(|t| **t != IGNORE_TARGET && **t % 7 == 3)
            {
                *t += 1;
            }
        }
        let frozen = FrozenModel::new(&c.model.layout, &c.base, format);
        let expanded = frozen.to_f32(&c.model.layout);
        assert_ne!(expanded, c.base, "{format:?} rounds the matrices");
        let ad = random_adapters(&c.layout, 12);
        let run = |base: Base| {
            let k = CpuKernels;
            let adapters = Adapters {
                layout: &c.layout,
                params: &ad,
                dropout_seed: Some(5),
            };
            let mut acts = c.model.activations_adapted(&k, &c.layout, 2, 5);
            let b = Batch {
                inputs: &c.inputs,
                targets: &c.targets,
            };
            let mut grads = vec![0.0f32; ad.len()];
            let loss = c
                .model
                .forward_backward_adapted(&k, base, &adapters, &mut grads, &mut acts, b, 1.0)
                .unwrap();
            (loss, grads, acts.lora.is_some())
        };
        let (l_compact, g_compact, _) = run(Base::Compact(&frozen));
        let (l_f32, g_f32, _) = run(Base::F32(&expanded));
        assert!(
            (l_compact - l_f32).abs() <= 1e-6 * l_f32.abs(),
            "{format:?}: loss {l_compact} vs {l_f32}"
        );
        let norm = g_f32
            .iter()
            .map(|x| (*x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let diff = g_f32
            .iter()
            .zip(&g_compact)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            diff <= 1e-5 * norm,
            "{format:?}: gradients differ by {:.2e} of their norm",
            diff / norm
        );
    }
}
