//! KV-cache decoding gives the same logits as a full forward pass over the same tokens.

mod common;

use handgrad::backend::cpu::CpuKernels;
use handgrad::generate::Decoder;
use handgrad::model::{Architecture, ModelConfig, RopeStyle, Transformer};

fn check(cfg: ModelConfig) {
    let model = Transformer::new(cfg);
    let mut params = model.layout.init(model.cfg.n_layers, 5);
    // Larger weights than the default init so that attention is far from uniform.
    for t in &model.layout.tensors {
        if t.kind != handgrad::model::params::TensorKind::NormGain {
            for (i, p) in params[t.range()].iter_mut().enumerate() {
                *p *= 4.0 + (i % 5) as f32;
            }
        }
    }
    let seq = 13;
    let vocab = model.cfg.vocab_size;
    let tokens: Vec<u32> = (0..seq).map(|i| ((i * 31 + 7) % vocab) as u32).collect();
    let mut acts = model.activations(1, seq);
    model
        .forward(&CpuKernels, &params, &mut acts, &tokens)
        .unwrap();
    let mut dec = Decoder::new(&model, &params, seq).unwrap();
    let mut worst = 0.0f32;
    for (t, &tok) in tokens.iter().enumerate() {
        let logits = dec.step(&CpuKernels, tok).unwrap();
        let full = &acts.logits[t * vocab..(t + 1) * vocab];
        for (a, b) in logits.iter().zip(full) {
            worst = worst.max((a - b).abs());
        }
    }
    let scale = acts.logits.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    eprintln!("max |logit| {scale}, worst difference {worst}");
    assert!(scale > 0.5, "logits too small for a meaningful test");
    assert!(
        worst < 1e-5,
        "KV-cache logits differ from the full forward by {worst}"
    );
    // The cache is full now.
    assert!(dec.step(&CpuKernels, 0).is_err());
}

#[test]
fn llama_gqa_rotate_half() {
    check(ModelConfig::preset("tiny").unwrap());
}

#[test]
fn llama_interleaved_untied() {
    let mut c = ModelConfig::preset("tiny").unwrap();
    c.rope_style = RopeStyle::Interleaved;
    c.tie_embeddings = false;
    check(c);
}

#[test]
fn qwen3_qk_norm_wide_heads() {
    let mut c = ModelConfig::preset("tiny").unwrap();
    c.arch = Architecture::Qwen3;
    c.head_dim = 8;
    check(c);
}
