//! Parity with Hugging Face transformers: logits, loss and every parameter gradient of small
//! random Llama / Qwen3 models, as written by `tools/golden/make_model_parity.py`.

mod common;

use handgrad::backend::CpuKernels;
use handgrad::formats::safetensors::SafetensorsFile;
use handgrad::model::{Batch, ModelConfig, Transformer};

struct Case {
    model: Transformer,
    params: Vec<f32>,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    batch: usize,
    seq: usize,
    file: SafetensorsFile,
}

fn load(name: &str) -> Case {
    let path = common::repo(&format!("tests/golden/parity_{name}.safetensors"));
    let file = SafetensorsFile::open(&path).unwrap();
    let config_text = file.metadata().unwrap()["config"].clone();
    let config_json: serde_json::Value = serde_json::from_str(&config_text).unwrap();
    let cfg = ModelConfig::from_hf_json(&config_json, name).unwrap();
    let model = Transformer::new(cfg);
    let mut params = vec![0.0f32; model.layout.total()];
    for t in &model.layout.tensors {
        file.read_f32_into(&t.name, &t.shape, &mut params[t.range()])
            .unwrap();
    }
    let (shape, ids) = file.read_i64("input_ids").unwrap();
    let (batch, seq) = (shape[0], shape[1] - 1);
    let mut inputs = Vec::new();
    let mut targets = Vec::new();
    for b in 0..batch {
        let row = &ids[b * (seq + 1)..(b + 1) * (seq + 1)];
        inputs.extend(row[..seq].iter().map(|&x| x as u32));
        targets.extend(row[1..].iter().map(|&x| x as u32));
    }
    Case {
        model,
        params,
        inputs,
        targets,
        batch,
        seq,
        file,
    }
}

fn check(name: &str) {
    let c = load(name);
    let k = CpuKernels;
    let mut acts = c.model.activations(&k, c.batch, c.seq);
    let batch = Batch {
        inputs: &c.inputs,
        targets: &c.targets,
    };

    // Logits within 1e-4 absolute.
    c.model
        .forward(&k, &c.params, &mut acts, &c.inputs)
        .unwrap();
    let (_, ref_logits) = c.file.read_f32("logits").unwrap();
    assert_eq!(ref_logits.len(), acts.logits.len());
    let max_diff = ref_logits
        .iter()
        .zip(&acts.logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff < 1e-4, "{name}: logits differ by {max_diff}");

    // Loss within 1e-4 absolute, gradients within 1e-3 of their norm.
    let mut grads = vec![0.0f32; c.params.len()];
    let loss = c
        .model
        .forward_backward(&k, &c.params, &mut grads, &mut acts, batch, 1.0)
        .unwrap();
    let (_, ref_loss) = c.file.read_f32("loss").unwrap();
    assert!(
        (loss - ref_loss[0] as f64).abs() < 1e-4,
        "{name}: loss {loss} vs {}",
        ref_loss[0]
    );
    let eval_loss = c.model.loss(&k, &c.params, &mut acts, batch).unwrap();
    assert!((eval_loss - loss).abs() < 1e-6);

    for t in &c.model.layout.tensors {
        let (_, reference) = c.file.read_f32(&format!("grad.{}", t.name)).unwrap();
        let ours = &grads[t.range()];
        let norm = reference
            .iter()
            .map(|x| (*x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let diff = reference
            .iter()
            .zip(ours)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            norm > 0.0,
            "{name}: reference gradient of {} is zero",
            t.name
        );
        assert!(
            diff / norm < 1e-3,
            "{name}: gradient of {} off by {:.2e} of its norm",
            t.name,
            diff / norm
        );
    }
}

#[test]
fn llama_with_gqa_and_untied_classifier_matches_transformers() {
    let c = load("llama_gqa");
    assert!(c.model.cfg.n_kv_heads < c.model.cfg.n_heads);
    assert!(!c.model.cfg.tie_embeddings);
    check("llama_gqa");
}

#[test]
fn llama_with_tied_embeddings_matches_transformers() {
    check("llama_tied");
}

#[test]
fn qwen3_with_qk_norm_and_wide_heads_matches_transformers() {
    let c = load("qwen3_hd");
    assert!(c.model.cfg.qk_norm());
    assert_ne!(c.model.cfg.head_dim, c.model.cfg.dim / c.model.cfg.n_heads);
    assert_eq!(c.model.cfg.rope_theta, 1e6);
    check("qwen3_hd");
}
