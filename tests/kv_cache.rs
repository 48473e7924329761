//! KV-cache decoding gives the same logits as a full forward pass over the same tokens.

mod common;

use handgrad::backend::CpuKernels;
use handgrad::generate::{Decoder, WeightFormat};
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
    let mut acts = model.activations(&CpuKernels, 1, seq);
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

    // A prompt prefilled in one batched pass, then token by token: the same logits.
    for split in [2, 7] {
        let mut dec = Decoder::new(&model, &params, seq).unwrap();
        let mut logits = dec.prefill(&CpuKernels, &tokens[..split]).unwrap().to_vec();
        for (t, &tok) in tokens.iter().enumerate().skip(split) {
            let full = &acts.logits[(t - 1) * vocab..t * vocab];
            let diff = logits
                .iter()
                .zip(full)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                diff < 1e-5,
                "prefill of {split}: position {t} differs by {diff}"
            );
            logits = dec.step(&CpuKernels, tok).unwrap().to_vec();
        }
        // A second prefill after the first continues the same sequence.
        let mut dec2 = Decoder::new(&model, &params, seq).unwrap();
        dec2.prefill(&CpuKernels, &tokens[..split]).unwrap();
        let l2 = dec2.prefill(&CpuKernels, &tokens[split..]).unwrap();
        let full = &acts.logits[(seq - 1) * vocab..seq * vocab];
        let diff = l2
            .iter()
            .zip(full)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-5, "two prefills differ by {diff}");
    }
}

/// `--weights bf16` changes what the decoder reads: half the bytes, and logits that differ
/// from fp32 by bf16 rounding only.
#[test]
fn bf16_weights_are_read_when_asked_for() {
    let model = Transformer::new(ModelConfig::preset("tiny").unwrap());
    let params = model.layout.init(model.cfg.n_layers, 5);
    let tokens = [3u32, 9, 27, 17];
    let mut f32_dec = Decoder::new(&model, &params, 8).unwrap();
    let mut bf16_dec = Decoder::new(&model, &params, 8)
        .unwrap()
        .with_bf16_weights();
    assert_eq!(f32_dec.weight_format(), WeightFormat::Fp32);
    assert_eq!(bf16_dec.weight_format(), WeightFormat::Bf16);
    assert_eq!(
        2 * bf16_dec.weight_bytes_per_token(),
        f32_dec.weight_bytes_per_token()
    );
    let (mut worst, mut scale) = (0.0f32, 0.0f32);
    for &t in &tokens {
        let a = f32_dec.step(&CpuKernels, t).unwrap().to_vec();
        let b = bf16_dec.step(&CpuKernels, t).unwrap();
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs());
            scale = scale.max(x.abs());
        }
    }
    // Different (the bf16 copy is what was read) but close (8 significant bits per weight).
    assert!(
        worst > 0.0,
        "bf16 weights gave bit-identical logits: the copy was not read"
    );
    assert!(
        worst < 2e-2 * scale.max(1e-3),
        "bf16 logits off by {worst} (scale {scale})"
    );
}

/// `--weights q8`: int8 weights (a quarter of the bytes plus scales), logits within the
/// quantisation error of fp32, and a prompt's batched pass (int8 matrix products) agreeing
/// with the same tokens fed one at a time (int8 matrix-vector products).
#[test]
fn q8_weights_are_read_and_prefill_matches_stepping() {
    let model = Transformer::new(ModelConfig::preset("tiny").unwrap());
    let params = model.layout.init(model.cfg.n_layers, 5);
    let tokens = [3u32, 9, 27, 17, 5, 40];
    let mut f32_dec = Decoder::new(&model, &params, 8).unwrap();
    let mut q8_dec = Decoder::new(&model, &params, 8)
        .unwrap()
        .with_weights(WeightFormat::Q8);
    assert_eq!(q8_dec.weight_format(), WeightFormat::Q8);
    let ratio = q8_dec.weight_bytes_per_token() as f64 / f32_dec.weight_bytes_per_token() as f64;
    assert!(
        (0.25..0.4).contains(&ratio),
        "q8 reads {ratio} of fp32's bytes (one per weight and a 4-byte scale per group)"
    );
    let (mut worst, mut scale) = (0.0f32, 0.0f32);
    let mut last = Vec::new();
    for &t in &tokens {
        let a = f32_dec.step(&CpuKernels, t).unwrap().to_vec();
        let b = q8_dec.step(&CpuKernels, t).unwrap();
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs());
            scale = scale.max(x.abs());
        }
        last = b.to_vec();
    }
    assert!(
        worst > 0.0,
        "q8 weights gave fp32's logits: the int8 copy was not read"
    );
    assert!(
        worst < 5e-2 * scale.max(1e-3),
        "q8 logits off by {worst} (scale {scale})"
    );
    let mut batched = Decoder::new(&model, &params, 8)
        .unwrap()
        .with_weights(WeightFormat::Q8);
    let l = batched.prefill(&CpuKernels, &tokens).unwrap();
    let diff = l
        .iter()
        .zip(&last)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(
        diff < 1e-4 * scale.max(1.0),
        "q8 prefill and stepping differ by {diff}"
    );
}

/// The int8 checks on every int8 path a host of this kind can take, each in its own process
/// (the choice is read once per process): the packed AVX512-VNNI products of several rows
/// (this host's default where it has VNNI), the row-major kernels (`HANDGRAD_INT8_PACKED=0`),
/// AVX2 without VNNI, and the portable loop.
#[test]
fn q8_decoding_agrees_on_every_int8_path() {
    use handgrad::backend::cpu::{gemm_q8, quant};
    let path = || {
        format!(
            "{}, packed products {}",
            quant::dot_isa().describe(),
            gemm_q8::used(quant::DEFAULT_GROUP)
        )
    };
    if common::in_child() {
        q8_weights_are_read_and_prefill_matches_stepping();
        check_batched(
            ModelConfig::preset("tiny").unwrap(),
            &CpuKernels,
            &[WeightFormat::Q8],
        );
        eprintln!("q8 checks passed on: {}", path());
        return;
    }
    eprintln!("this process: {}", path());
    let paths: [(&str, &str, &str); 4] = [
        ("HANDGRAD_INT8_PACKED", "1", ""),
        ("HANDGRAD_INT8_PACKED", "0", "packed products false"),
        ("HANDGRAD_INT8_ISA", "avx2", "packed products false"),
        (
            "HANDGRAD_INT8_ISA",
            "portable",
            "portable int8 dot products, packed products false",
        ),
    ];
    for (var, value, expect) in paths {
        let out = common::rerun_in_child("q8_decoding_agrees_on_every_int8_path", &[(var, value)]);
        assert_eq!(out.code, 0, "{var}={value}:\n{}{}", out.stdout, out.stderr);
        let line = out
            .stderr
            .lines()
            .find(|l| l.starts_with("q8 checks passed on"))
            .unwrap_or_else(|| panic!("{var}={value}: no verdict\n{}", out.stderr));
        assert!(line.contains(expect), "{var}={value}: {line}");
        eprintln!("{var}={value}: {line}");
    }
}

/// A bf16 KV cache (the default with bf16 and q8 weights): logits within bf16 rounding of
/// the f32 cache's but not equal (the rounding happened); a prompt's batched pass agrees with
/// the same tokens stepped one at a time (the prompt's own attention reads the rounded keys
/// and values the cache will hold); GQA, Qwen3 with q/k norms, and 8-wide heads (the portable
/// loops rather than AVX-512).
#[test]
fn bf16_cache_is_within_bf16_rounding_and_prefill_matches_stepping() {
    use handgrad::generate::KvFormat;
    let mut qwen = ModelConfig::preset("tiny").unwrap();
    qwen.arch = Architecture::Qwen3;
    qwen.n_kv_heads = 1;
    let mut narrow = ModelConfig::preset("tiny").unwrap();
    narrow.head_dim = 8;
    for cfg in [ModelConfig::preset("tiny").unwrap(), qwen, narrow] {
        let model = Transformer::new(cfg);
        let mut params = model.layout.init(model.cfg.n_layers, 7);
        for p in params.iter_mut() {
            *p *= 3.0; // attention far from uniform
        }
        let tokens = [3u32, 9, 27, 17, 5, 40, 2, 11];
        let new = |format| {
            Decoder::new(&model, &params, 16)
                .unwrap()
                .with_kv_format(format)
        };
        let (mut f32_dec, mut bf16_dec) = (new(KvFormat::F32), new(KvFormat::Bf16));
        assert_eq!(bf16_dec.kv_format(), KvFormat::Bf16);
        let (mut worst, mut scale) = (0.0f32, 0.0f32);
        let mut last = Vec::new();
        for &t in &tokens {
            let a = f32_dec.step(&CpuKernels, t).unwrap().to_vec();
            let b = bf16_dec.step(&CpuKernels, t).unwrap();
            for (x, y) in a.iter().zip(b) {
                worst = worst.max((x - y).abs());
                scale = scale.max(x.abs());
            }
            last = b.to_vec();
        }
        let tol = handgrad::backend::Tolerance::BF16.rel as f32 * scale;
        assert!(worst > 0.0, "the bf16 cache gave the f32 cache's logits");
        assert!(worst < tol, "bf16 cache off by {worst} (tolerance {tol})");
        let mut batched = new(KvFormat::Bf16);
        let l = batched.prefill(&CpuKernels, &tokens).unwrap();
        let diff = l
            .iter()
            .zip(&last)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            diff < 1e-4 * scale.max(1.0),
            "bf16 cache: prefill and stepping differ by {diff}"
        );
    }
    // The defaults: f32 with fp32 weights, bf16 with bf16 or int8 weights.
    let model = Transformer::new(ModelConfig::preset("tiny").unwrap());
    let params = model.layout.init(model.cfg.n_layers, 7);
    for (weights, cache) in [
        (WeightFormat::Fp32, KvFormat::F32),
        (WeightFormat::Bf16, KvFormat::Bf16),
        (WeightFormat::Q8, KvFormat::Bf16),
    ] {
        let d = Decoder::new(&model, &params, 4)
            .unwrap()
            .with_weights(weights);
        assert_eq!(d.kv_format(), cache, "{weights}");
        assert_eq!(d.new_sequence(4).format(), cache, "{weights}");
    }
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

/// Several sequences at different positions, each with its own cache, decoded together in
/// one pass (`step_batch`, how `serve` runs concurrent requests): every row's logits equal
/// those of its sequence decoded alone, within the rounding of products summed in another
/// order; with every weight format (a few rows read the same compact copy one row does).
fn check_batched(cfg: ModelConfig, k: &dyn handgrad::backend::Kernels, formats: &[WeightFormat]) {
    let model = Transformer::new(cfg);
    let params = model.layout.init(model.cfg.n_layers, 9);
    let vocab = model.cfg.vocab_size;
    let prompts: Vec<Vec<u32>> = [2usize, 5, 9]
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            (0..n)
                .map(|i| ((i * 17 + s * 5 + 3) % vocab) as u32)
                .collect()
        })
        .collect();
    for &weights in formats {
        let mut dec = Decoder::new(&model, &params, 1)
            .unwrap()
            .with_weights(weights);
        let mut seqs: Vec<_> = prompts.iter().map(|_| dec.new_sequence(16)).collect();
        let mut alone: Vec<Decoder> = prompts
            .iter()
            .map(|_| {
                Decoder::new(&model, &params, 16)
                    .unwrap()
                    .with_weights(weights)
            })
            .collect();
        for ((p, s), a) in prompts.iter().zip(&mut seqs).zip(&mut alone) {
            let l1 = dec.prefill_sequence(k, s, p).unwrap().to_vec();
            let l2 = a.prefill(k, p).unwrap();
            assert_eq!(l1, l2, "{weights}: a prefill into a sequence differs");
        }
        let mut worst = 0.0f32;
        let mut scale = 0.0f32;
        for step in 0..4u32 {
            let tokens: Vec<u32> = (0..prompts.len() as u32)
                .map(|s| (step * 7 + s * 11 + 1) % vocab as u32)
                .collect();
            let mut refs: Vec<&mut handgrad::generate::KvSequence> = seqs.iter_mut().collect();
            let together = dec.step_batch(k, &mut refs, &tokens).unwrap().to_vec();
            assert_eq!(together.len(), prompts.len() * vocab);
            for (i, a) in alone.iter_mut().enumerate() {
                let one = a.step(k, tokens[i]).unwrap();
                for (x, y) in together[i * vocab..(i + 1) * vocab].iter().zip(one) {
                    worst = worst.max((x - y).abs());
                    scale = scale.max(y.abs());
                }
            }
        }
        for (s, p) in seqs.iter().zip(&prompts) {
            assert_eq!(s.position(), p.len() + 4);
        }
        let tol = 1e-5;
        eprintln!("{weights}: worst difference {worst} (max |logit| {scale}, tolerance {tol})");
        assert!(worst < tol, "{weights}: batched rows differ by {worst}");
    }
    // Mismatched lengths and a full cache are errors, not panics.
    let mut dec = Decoder::new(&model, &params, 1).unwrap();
    let mut a = dec.new_sequence(1);
    let mut b = dec.new_sequence(4);
    assert!(dec.step_batch(k, &mut [&mut a], &[1, 2]).is_err());
    dec.step_batch(k, &mut [&mut a, &mut b], &[1, 2]).unwrap();
    assert!(dec.step_batch(k, &mut [&mut a, &mut b], &[1, 2]).is_err());
}

#[test]
fn sequences_decoded_together_match_alone() {
    use handgrad::backend::CpuBf16Kernels;
    let all = [WeightFormat::Fp32, WeightFormat::Bf16, WeightFormat::Q8];
    check_batched(ModelConfig::preset("tiny").unwrap(), &CpuKernels, &all);
    let mut c = ModelConfig::preset("tiny").unwrap();
    c.arch = Architecture::Qwen3;
    c.n_kv_heads = 1;
    check_batched(c.clone(), &CpuKernels, &all);
    // The bf16 kernels read a bf16 copy for a few rows as for one.
    check_batched(c, &CpuBf16Kernels, &[WeightFormat::Bf16]);
}
