//! GGUF export (`handgrad convert ... out.gguf`): what handgrad writes, its own reader reads
//! back (f32 exactly, f16/bf16/Q8_0 within the format's rounding); the reference reader (PyPI
//! `gguf`, llama.cpp's gguf-py) reads every key and tensor back; llama.cpp itself (PyPI
//! `llama-cpp-python`) tokenizes a prompt as handgrad does and continues it greedily with the
//! same tokens. The Python checks skip without their packages (strict mode fails).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use handgrad::backend::CpuKernels;
use handgrad::formats::TokenizerFile;
use handgrad::formats::gguf::write::{Extras, MetaValue};
use handgrad::formats::gguf::{self, GgufDtype, GgufFile, Value};
use handgrad::generate::{GenerateOptions, Sampling, WeightFormat, generate};
use handgrad::model::config::{Architecture, RopeStyle};
use handgrad::model::rope_layout::convert_rope_style;
use handgrad::model::{ModelConfig, ParamLayout, Transformer};
use serde_json::Value as Json;

const DTYPES: [GgufDtype; 4] = [
    GgufDtype::F32,
    GgufDtype::F16,
    GgufDtype::Bf16,
    GgufDtype::Q8_0,
];

/// A small Llama: GQA, a SwiGLU width (176) that is no whole number of Q8_0 blocks.
fn llama_cfg(vocab: usize) -> ModelConfig {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.arch = Architecture::Llama;
    cfg.dim = 64;
    cfg.n_layers = 2;
    cfg.n_heads = 4;
    cfg.n_kv_heads = 2;
    cfg.head_dim = 16;
    cfg.ffn_dim = 176;
    cfg.vocab_size = vocab;
    cfg.max_seq_len = 128;
    cfg.rope_style = RopeStyle::Interleaved;
    cfg.tie_embeddings = false;
    cfg.bos_token_id = Some(1);
    cfg.eos_token_id = Some(2);
    cfg
}

/// A small Qwen3: q/k norms, head_dim 32 over dim 64 with 4 heads (key_length needed), tied.
fn qwen3_cfg(vocab: usize) -> ModelConfig {
    let mut cfg = llama_cfg(vocab);
    cfg.arch = Architecture::Qwen3;
    cfg.head_dim = 32;
    cfg.ffn_dim = 128;
    cfg.norm_eps = 1e-6;
    cfg.rope_theta = 1e6;
    cfg.rope_style = RopeStyle::RotateHalf;
    cfg.tie_embeddings = true;
    cfg.bos_token_id = None;
    cfg.eos_token_id = None;
    cfg
}

/// Random weights large enough that a greedy continuation wanders over many tokens (the
/// initialisation's small matrices make every position pick the same token), with norm gains
/// away from 1 so that their layout matters. A tied classifier favours the token just read
/// (its own embedding is in the residual stream): there the embedding stays small beside the
/// layers' outputs.
fn lively_params(cfg: &ModelConfig, seed: u64) -> Vec<f32> {
    let layout = ParamLayout::new(cfg);
    let mut p = layout.init(cfg.n_layers, seed);
    let noise = common::randn(p.len(), seed + 1, 0.0, 1.0);
    let (embed, matrices) = if cfg.tie_embeddings {
        (1.0, 4.0)
    } else {
        (3.0, 3.0)
    };
    for (id, t) in layout.tensors.iter().enumerate() {
        for i in t.range() {
            p[i] = if t.shape.len() == 1 {
                1.0 + 0.3 * noise[i]
            } else if id == layout.embed {
                p[i] * embed
            } else {
                p[i] * matrices
            };
        }
    }
    p
}

fn temp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("handgrad-gguf-")
        .tempdir()
        .unwrap()
}

/// The largest error the written type allows for `x` (`block_amax`: max |x| of its Q8_0 block).
/// f16 and bf16 round to nearest: half an ulp, 2^-11 and 2^-8 of |x| (f16's subnormal spacing
/// 2^-24 below 2^-14). Q8_0 stores `round(x / d)` with `d = amax / 127` kept as f16, so the
/// value read is off by at most `d / 2` plus 127 times the f16 rounding of `d`.
fn bound(ty: &str, x: f32, block_amax: f32) -> f32 {
    match ty {
        "F32" => 0.0,
        "F16" => (x.abs() * 2f32.powi(-11)).max(2f32.powi(-25)),
        "BF16" => x.abs() * 2f32.powi(-8),
        "Q8_0" => {
            let d = block_amax / 127.0;
            (d * (0.5 + 127.0 * 2f32.powi(-11)) + 127.0 * 2f32.powi(-25)) * (1.0 + 1e-5)
        }
        other => panic!("unexpected type {other}"),
    }
}

fn type_of(g: &GgufFile, name: &str) -> String {
    match g.tensors[name].ggml_type {
        0 => "F32",
        1 => "F16",
        8 => "Q8_0",
        30 => "BF16",
        t => panic!("type {t}"),
    }
    .to_string()
}

/// The parameters in the pairing `style` (the reader loads Llama interleaved).
fn in_style(cfg: &ModelConfig, params: &[f32], style: RopeStyle) -> Vec<f32> {
    let mut cfg = cfg.clone();
    let mut p = params.to_vec();
    let layout = ParamLayout::new(&cfg);
    convert_rope_style(&mut cfg, &layout, &mut p, style);
    p
}

#[test]
fn handgrad_reads_back_what_it_writes_in_every_dtype() {
    let dir = temp();
    for (label, cfg) in [
        ("llama", llama_cfg(96)),
        ("qwen3", qwen3_cfg(96)),
        // A Llama read from Hugging Face pairs RoPE rotate-half: written interleaved.
        ("llama-hf-pairing", {
            let mut c = llama_cfg(96);
            c.rope_style = RopeStyle::RotateHalf;
            c
        }),
    ] {
        let params = lively_params(&cfg, 3);
        for dtype in DTYPES {
            let path = dir.path().join(format!("{label}-{}.gguf", dtype.name()));
            let w = gguf::save(&path, &cfg, &params, dtype, &Extras::default()).unwrap();
            assert_eq!(w.bytes, std::fs::metadata(&path).unwrap().len());
            let m = gguf::load(&path).unwrap();
            let g = GgufFile::open(&path).unwrap();
            let mut want_cfg = cfg.clone();
            want_cfg.rope_style = m.cfg.rope_style;
            assert_eq!(m.cfg, want_cfg, "{label} {dtype:?}");
            let want = in_style(&cfg, &params, m.cfg.rope_style);
            let layout = ParamLayout::new(&cfg);
            for t in &layout.tensors {
                let name = gguf::gguf_name(&t.name);
                let ty = type_of(&g, &name);
                if t.shape.len() == 1 {
                    assert_eq!(ty, "F32", "{name}: norms stay f32");
                } else if dtype == GgufDtype::Q8_0 && t.shape[1] % 32 != 0 {
                    assert_eq!(ty, "F16", "{name}: no whole Q8_0 blocks");
                    assert!(w.notes.iter().any(|n| n.starts_with(&name)), "{name}");
                } else {
                    let expected = ["F32", "F16", "BF16", "Q8_0"]
                        [DTYPES.iter().position(|&d| d == dtype).unwrap()];
                    assert_eq!(ty, expected, "{name}");
                }
                let (a, b) = (&want[t.range()], &m.params[t.range()]);
                for (k, (blk_a, blk_b)) in a.chunks(32).zip(b.chunks(32)).enumerate() {
                    let amax = blk_a.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                    for (x, y) in blk_a.iter().zip(blk_b) {
                        let err = (x - y).abs();
                        assert!(
                            err <= bound(&ty, *x, amax),
                            "{label} {dtype:?} {name} block {k}: wrote {x}, read {y} ({ty})"
                        );
                    }
                }
            }
            let tied = !g.tensors.contains_key("output.weight");
            assert_eq!(tied, cfg.tie_embeddings);
        }
    }
}

/// The Llama 2 tokenizer (llama2.c `tokenizer.bin`) fixture and a Llama of its vocabulary.
fn llama_with_tokenizer() -> Option<(ModelConfig, Vec<f32>, TokenizerFile)> {
    let p = common::fixture("llama2/tokenizer.bin")?;
    let tok = TokenizerFile {
        name: "tokenizer.bin".into(),
        bytes: std::fs::read(p).unwrap(),
    };
    let cfg = llama_cfg(32000);
    Some((cfg.clone(), lively_params(&cfg, 11), tok))
}

/// The Qwen tokenizer fixture and a Qwen3 with 11 ids beyond it (padding tokens).
fn qwen3_with_tokenizer() -> Option<(ModelConfig, Vec<f32>, TokenizerFile)> {
    let p = common::fixture("qwen/tokenizer.json")?;
    let tok = TokenizerFile {
        name: "tokenizer.json".into(),
        bytes: std::fs::read(p).unwrap(),
    };
    let cfg = qwen3_cfg(151_669 + 11);
    Some((cfg.clone(), lively_params(&cfg, 12), tok))
}

/// A byte-level BPE tokenizer as handgrad trains it (GPT-2 pre-tokenizer), learnt from the
/// TinyStories sample, and a Llama of its vocabulary.
fn llama_with_handgrad_bpe() -> Option<(ModelConfig, Vec<f32>, TokenizerFile)> {
    use handgrad::tokenizer::bpe_train::{BpeOptions, BpeTrainer};
    let text = std::fs::read_to_string(common::fixture("tinystories/valid-sample.txt")?).unwrap();
    let mut trainer = BpeTrainer::new();
    trainer.feed(&text).unwrap();
    let opts = BpeOptions {
        vocab_size: 600,
        ..Default::default()
    };
    let json = trainer.train(&opts).unwrap();
    let tok = TokenizerFile {
        name: "tokenizer.json".into(),
        bytes: serde_json::to_vec(&json).unwrap(),
    };
    let cfg = llama_cfg(opts.vocab_size);
    Some((cfg.clone(), lively_params(&cfg, 13), tok))
}

const CHAT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Writes a model with its tokenizer (and a chat template for Qwen3).
fn write_with_tokenizer(
    dir: &Path,
    label: &str,
    cfg: &ModelConfig,
    params: &[f32],
    tok: &TokenizerFile,
    dtype: GgufDtype,
) -> PathBuf {
    let v = gguf::vocab::metadata(tok, cfg.vocab_size, dir).unwrap();
    assert!(v.warnings.is_empty(), "{:?}", v.warnings);
    let extras = Extras {
        name: label.into(),
        tokenizer: v.metadata,
        chat_template: (cfg.arch == Architecture::Qwen3).then(|| CHAT_TEMPLATE.to_string()),
    };
    let path = dir.join(format!("{label}-{}.gguf", dtype.name()));
    gguf::save(&path, cfg, params, dtype, &extras).unwrap();
    path
}

/// A Python (`HANDGRAD_PYTHON`, default `python3`) that imports `module`, or `None` after
/// saying why the check is skipped.
fn python_with(module: &str, pip: &str) -> Option<String> {
    let python = std::env::var("HANDGRAD_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Some(python)
    } else {
        common::skip(&format!(
            "{python} cannot import {module} (pip install {pip}): this GGUF check does not run"
        ));
        None
    }
}

fn run_json(python: &str, args: &[&str]) -> Json {
    let out = Command::new(python).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The JSON form of a value of handgrad's reader, as gguf-py's `contents()` gives it.
fn json_of(v: &Value) -> Json {
    match v {
        Value::Int(x) => Json::from(*x),
        Value::Uint(x) => Json::from(*x),
        Value::Float(x) => Json::from(*x),
        Value::Bool(x) => Json::from(*x),
        Value::Str(s) => Json::from(s.clone()),
        Value::Array(a) => Json::Array(a.iter().map(json_of).collect()),
    }
}

/// Equal, floats compared as the f32 they were written as.
fn same(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Array(x), Json::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        (Json::Number(x), Json::Number(y)) if x.is_f64() || y.is_f64() => {
            x.as_f64().map(|v| v as f32) == y.as_f64().map(|v| v as f32)
        }
        _ => a == b,
    }
}

#[test]
fn the_gguf_python_package_reads_every_key_and_tensor() {
    let Some(python) = python_with("gguf", "gguf") else {
        return;
    };
    let (Some(llama), Some(qwen)) = (llama_with_tokenizer(), qwen3_with_tokenizer()) else {
        return;
    };
    let dir = temp();
    let script = common::repo("tools/gguf/check_gguf.py");
    for (label, (cfg, params, tok)) in [("llama", llama), ("qwen3", qwen)] {
        for dtype in DTYPES {
            let path = write_with_tokenizer(dir.path(), label, &cfg, &params, &tok, dtype);
            let py = run_json(&python, &[script.to_str().unwrap(), path.to_str().unwrap()]);
            let g = GgufFile::open(&path).unwrap();
            assert_eq!(py["version"], 3);
            assert_eq!(py["alignment"], 32);
            // Every key, with the value handgrad's reader sees and the type llama.cpp wants.
            let meta = py["metadata"].as_object().unwrap();
            assert_eq!(meta.len(), g.metadata.len(), "{label}: keys");
            for (k, v) in &g.metadata {
                let p = &meta[k.as_str()];
                assert!(same(&p["value"], &json_of(v)), "{label}: {k}");
                let want_type = match k.as_str() {
                    "tokenizer.ggml.tokens" | "tokenizer.ggml.merges" => "ARRAY[STRING]",
                    "tokenizer.ggml.token_type" => "ARRAY[INT32]",
                    "tokenizer.ggml.scores" => "ARRAY[FLOAT32]",
                    k if k.ends_with("epsilon") || k.ends_with("freq_base") => "FLOAT32",
                    k if k.starts_with("tokenizer.ggml.add_") => "BOOL",
                    "general.architecture"
                    | "general.name"
                    | "tokenizer.ggml.model"
                    | "tokenizer.ggml.pre"
                    | "tokenizer.chat_template" => "STRING",
                    _ => "UINT32",
                };
                assert_eq!(p["type"], want_type, "{label}: {k}");
            }
            // Every tensor: type, dims, offset, and its values as gguf-py dequantizes them.
            let tensors = py["tensors"].as_object().unwrap();
            assert_eq!(tensors.len(), g.tensors.len());
            for (name, t) in &g.tensors {
                let p = &tensors[name.as_str()];
                assert_eq!(p["type"], type_of(&g, name), "{name}");
                assert_eq!(p["dims"], serde_json::json!(t.dims), "{name}");
                assert_eq!(p["offset"], t.offset, "{name}");
                assert_eq!(t.offset % 32, 0);
                let ours = g.read_f32(name, &path).unwrap();
                let head: Vec<f32> = p["head"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect();
                assert_eq!(head, ours[..head.len()], "{name}");
                let sum: f64 = ours.iter().map(|&x| x as f64).sum();
                let sumsq: f64 = ours.iter().map(|&x| x as f64 * x as f64).sum();
                let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * (1.0 + sumsq);
                assert!(close(p["sum"].as_f64().unwrap(), sum), "{name}: sum");
                assert!(close(p["sumsq"].as_f64().unwrap(), sumsq), "{name}: sumsq");
            }
        }
    }
}

/// handgrad's greedy continuation of `prompt` (BOS first when the tokenizer has one).
fn handgrad_greedy(
    cfg: &ModelConfig,
    params: &[f32],
    tok: &TokenizerFile,
    prompt: &str,
    n: usize,
) -> (Vec<u32>, Vec<u32>) {
    let tokenizer = tok.load(Path::new("fixture")).unwrap();
    let model = Transformer::new(cfg.clone());
    let opts = GenerateOptions {
        prompt: prompt.into(),
        max_tokens: n,
        sampling: Sampling::from_settings(0.0, 0, 1.0).unwrap(),
        seed: 0,
        add_bos: true,
        weights: WeightFormat::Fp32,
        kv_cache: handgrad::generate::KvFormat::F32,
        stop_ids: Vec::new(),
    };
    let g = generate(
        &model,
        params,
        &CpuKernels,
        tokenizer.as_ref(),
        &opts,
        &mut |_| std::ops::ControlFlow::Continue(()),
    )
    .unwrap();
    (g.prompt_ids, g.ids)
}

#[test]
fn llama_cpp_tokenizes_and_continues_as_handgrad_does() {
    let Some(python) = python_with("llama_cpp", "llama-cpp-python") else {
        return;
    };
    let (Some(llama), Some(qwen), Some(own)) = (
        llama_with_tokenizer(),
        qwen3_with_tokenizer(),
        llama_with_handgrad_bpe(),
    ) else {
        return;
    };
    let dir = temp();
    let script = common::repo("tools/gguf/llama_cpp_greedy.py");
    let n = 16;
    for (label, (cfg, params, tok), prompt) in [
        (
            "llama",
            llama,
            "Once upon a time, there was a little girl named Lily. She loved",
        ),
        (
            "qwen3",
            qwen,
            "Hello world! The quick brown fox, 12345 times.",
        ),
        (
            "llama-handgrad-bpe",
            own,
            "Lily's dog can't run 123 times!  \"Ok,\" she said.\nThe end",
        ),
    ] {
        let path = write_with_tokenizer(dir.path(), label, &cfg, &params, &tok, GgufDtype::F32);
        let (prompt_ids, ours) = handgrad_greedy(&cfg, &params, &tok, prompt, n);
        let distinct: std::collections::BTreeSet<_> = ours.iter().collect();
        assert!(
            distinct.len() >= 4,
            "{label}: a continuation of {ours:?} proves little"
        );
        let ids: Vec<String> = prompt_ids.iter().map(u32::to_string).collect();
        let n_s = n.to_string();
        let out = run_json(
            &python,
            &[
                script.to_str().unwrap(),
                path.to_str().unwrap(),
                "--text",
                prompt,
                "--ids",
                &ids.join(","),
                "--n",
                &n_s,
            ],
        );
        let theirs: Vec<u32> = serde_json::from_value(out["tokens"].clone()).unwrap();
        assert_eq!(theirs, prompt_ids, "{label}: llama.cpp's tokenization");
        // The next token's logits: the same up to f32 summation order.
        let theirs: Vec<f32> = serde_json::from_value(out["logits"].clone()).unwrap();
        let model = Transformer::new(cfg.clone());
        let mut dec = handgrad::generate::Decoder::new(&model, &params, prompt_ids.len()).unwrap();
        let ours_logits = dec.prefill(&CpuKernels, &prompt_ids).unwrap();
        assert_eq!(theirs.len(), ours_logits.len());
        let scale = ours_logits.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let worst = theirs
            .iter()
            .zip(ours_logits)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{label}: logits differ by at most {worst:.2e} (largest |logit| {scale:.2})");
        assert!(worst <= 1e-4 * scale, "{label}: {worst} vs {scale}");
        let cont: Vec<u32> = serde_json::from_value(out["continuation"].clone()).unwrap();
        // handgrad stops at an end-of-text id; llama.cpp's loop goes on.
        assert_eq!(cont[..ours.len()], ours[..], "{label}: greedy continuation");
        eprintln!("{label}: prompt {prompt_ids:?}, continuation {ours:?} (equal)");
        if label != "llama" {
            continue;
        }
        // The other types load and run too. llama.cpp also rounds the activations to the
        // weights' type (f16, bf16, or int8 blocks) before its matrix products, so its greedy
        // choices may part from handgrad's f32 ones: how far they agree is printed, not checked.
        for dtype in [GgufDtype::F16, GgufDtype::Bf16, GgufDtype::Q8_0] {
            let path = write_with_tokenizer(dir.path(), label, &cfg, &params, &tok, dtype);
            let out = run_json(
                &python,
                &[
                    script.to_str().unwrap(),
                    path.to_str().unwrap(),
                    "--text",
                    prompt,
                    "--ids",
                    &ids.join(","),
                    "--n",
                    &n_s,
                ],
            );
            let cont: Vec<u32> = serde_json::from_value(out["continuation"].clone()).unwrap();
            assert_eq!(cont.len(), n, "{label} {dtype:?}");
            let agree = cont.iter().zip(&ours).take_while(|(a, b)| a == b).count();
            // Against handgrad running the weights as the file holds them (read back).
            let read = gguf::load(&path).unwrap();
            let model = Transformer::new(read.cfg.clone());
            let mut dec =
                handgrad::generate::Decoder::new(&model, &read.params, prompt_ids.len()).unwrap();
            let ours_logits = dec.prefill(&CpuKernels, &prompt_ids).unwrap();
            let theirs: Vec<f32> = serde_json::from_value(out["logits"].clone()).unwrap();
            let worst = theirs
                .iter()
                .zip(ours_logits)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            eprintln!(
                "{label} {}: llama.cpp's first {agree} of {n} greedy tokens equal handgrad's f32 ones; its logits differ from handgrad's on the file's weights by at most {worst:.2e}",
                dtype.name()
            );
        }
    }
}

/// Whether the file's metadata holds `key` with value `v`.
fn has(g: &GgufFile, key: &str, v: Value) -> bool {
    g.get(key) == Some(&v)
}

#[test]
fn tokenizer_metadata_is_what_llama_cpp_expects() {
    let (Some((lc, _, lt)), Some((qc, _, qt))) = (llama_with_tokenizer(), qwen3_with_tokenizer())
    else {
        return;
    };
    let dir = temp();
    let sp = gguf::vocab::metadata(&lt, lc.vocab_size, dir.path()).unwrap();
    let get = |m: &[(String, MetaValue)], k: &str| {
        m.iter()
            .find(|(key, _)| key == &format!("tokenizer.ggml.{k}"))
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let MetaValue::StrArray(tokens) = get(&sp.metadata, "tokens") else {
        panic!()
    };
    let MetaValue::I32Array(types) = get(&sp.metadata, "token_type") else {
        panic!()
    };
    assert_eq!(&tokens[..3], ["<unk>", "<s>", "</s>"]);
    assert_eq!(&types[..4], [2, 3, 3, 6]);
    assert_eq!(tokens[3], "<0x00>");
    // "▁the" is a normal piece with SentencePiece's space mark.
    let the = tokens.iter().position(|t| t == "\u{2581}the").unwrap();
    assert_eq!(types[the], 1);
    assert_eq!(get(&sp.metadata, "model"), MetaValue::Str("llama".into()));

    let bpe = gguf::vocab::metadata(&qt, qc.vocab_size, dir.path()).unwrap();
    assert_eq!(get(&bpe.metadata, "pre"), MetaValue::Str("qwen2".into()));
    let MetaValue::StrArray(tokens) = get(&bpe.metadata, "tokens") else {
        panic!()
    };
    let MetaValue::I32Array(types) = get(&bpe.metadata, "token_type") else {
        panic!()
    };
    assert_eq!(tokens.len(), qc.vocab_size);
    assert_eq!(tokens[151_643], "<|endoftext|>");
    assert_eq!(types[151_643], 3, "special added tokens are control tokens");
    assert_eq!(tokens[151_667], "<think>");
    assert_eq!(types[151_667], 4, "other added tokens are user-defined");
    assert_eq!(tokens[151_669], "[PAD151669]");
    assert_eq!(types[151_669], 5);
    assert_eq!(get(&bpe.metadata, "eos_token_id"), MetaValue::U32(151_643));
    assert_eq!(get(&bpe.metadata, "add_bos_token"), MetaValue::Bool(false));

    // A tokenizer larger than the model is refused.
    let err = gguf::vocab::metadata(&qt, 1000, dir.path()).unwrap_err();
    assert!(err.to_string().contains("151669 tokens"), "{err}");
}

/// `handgrad convert` writes GGUF from a Hugging Face folder (with its tokenizer and chat
/// template), and refuses a GGUF dtype for a Hugging Face folder in one line.
#[test]
fn convert_writes_gguf_from_the_command_line() {
    let Some(p) = common::fixture("qwen/tokenizer.json") else {
        return;
    };
    let dir = temp();
    let cfg = qwen3_cfg(151_669 + 11);
    let params = lively_params(&cfg, 5);
    let hf_dir = dir.path().join("qwen-hf");
    let tok = TokenizerFile {
        name: "tokenizer.json".into(),
        bytes: std::fs::read(&p).unwrap(),
    };
    handgrad::formats::hf::save(
        &hf_dir,
        &cfg,
        &params,
        handgrad::formats::hf::ExportDtype::F32,
        Some(&tok),
        u64::MAX,
    )
    .unwrap();
    std::fs::write(
        hf_dir.join("tokenizer_config.json"),
        serde_json::json!({"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>"}).to_string(),
    )
    .unwrap();
    let out_path = dir.path().join("model.gguf");
    let out = common::handgrad(
        &[
            "convert",
            hf_dir.to_str().unwrap(),
            out_path.to_str().unwrap(),
            "--dtype",
            "q8_0",
        ],
        dir.path(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("wrote GGUF file"), "{}", out.stderr);
    assert!(out.stderr.contains("Q8_0"), "{}", out.stderr);
    assert!(out.stderr.contains("with chat template"), "{}", out.stderr);
    let g = GgufFile::open(&out_path).unwrap();
    assert!(has(
        &g,
        "tokenizer.chat_template",
        Value::Str(CHAT_TEMPLATE.into())
    ));
    assert!(has(&g, "general.file_type", Value::Uint(7)));
    let m = gguf::load(&out_path).unwrap();
    assert_eq!(m.cfg.vocab_size, cfg.vocab_size);

    // --adapter: the GGUF file holds the merged weights, as every other output does.
    let adapter_dir = dir.path().join("adapter");
    let lora = handgrad::model::LoraLayout::new(
        &cfg,
        handgrad::model::lora::LoraConfig {
            rank: 2,
            alpha: 4.0,
            targets: handgrad::model::lora::LoraTarget::ALL.to_vec(),
            dropout: 0.0,
        },
    )
    .unwrap();
    let adapter = common::randn(lora.total(), 8, 0.0, 0.05);
    handgrad::formats::peft::save(&adapter_dir, &cfg, &lora, &adapter, Some("base")).unwrap();
    let merged_path = dir.path().join("merged.gguf");
    let out = common::handgrad(
        &[
            "convert",
            hf_dir.to_str().unwrap(),
            merged_path.to_str().unwrap(),
            "--adapter",
            adapter_dir.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let want =
        handgrad::formats::load_model_with_adapter(&hf_dir, Some(adapter_dir.as_path())).unwrap();
    assert_ne!(want.params, params, "the adapter changes the model");
    assert_eq!(gguf::load(&merged_path).unwrap().params, want.params);

    let bad = common::handgrad(
        &[
            "convert",
            hf_dir.to_str().unwrap(),
            dir.path().join("out-hf").to_str().unwrap(),
            "--dtype",
            "q8_0",
        ],
        dir.path(),
    );
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("GGUF type"), "{}", bad.stderr);
    assert_eq!(bad.stderr.trim().lines().count(), 1, "{}", bad.stderr);
}

/// The whole path a user takes: train on the built-in data, `convert` the run folder to GGUF,
/// and llama.cpp continues a prompt with the text `handgrad generate` prints at temperature 0.
#[test]
fn a_trained_run_converts_and_llama_cpp_continues_it_as_generate_does() {
    let Some(python) = python_with("llama_cpp", "llama-cpp-python") else {
        return;
    };
    let dir = temp();
    let w = dir.path();
    let ok = |o: common::Output, what: &str| {
        assert_eq!(o.code, 0, "{what}: {}", o.stderr);
        o
    };
    ok(
        common::handgrad(
            &[
                "train",
                "--model",
                "tiny",
                "--steps",
                "150",
                "--batch",
                "8",
                "--seq",
                "32",
                "--lr",
                "1e-2",
                "--run-dir",
                "run",
                "--quiet",
            ],
            w,
        ),
        "train",
    );
    let o = ok(
        common::handgrad(&["convert", "run", "model.gguf"], w),
        "convert",
    );
    assert!(o.stderr.contains("with tokenizer"), "{}", o.stderr);
    assert!(!o.stderr.contains("warning"), "{}", o.stderr);
    let prompt = "Once upon a time";
    let n = 24;
    let generated = ok(
        common::handgrad(
            &[
                "generate",
                "--run-dir",
                "run",
                "--prompt",
                prompt,
                "--temperature",
                "0",
                "--max-tokens",
                &n.to_string(),
            ],
            w,
        ),
        "generate",
    )
    .stdout;
    let tok = handgrad::tokenizer::load(&w.join("run/tokenizer.json")).unwrap();
    let ids = tok.encode(prompt).unwrap();
    let ids_s: Vec<String> = ids.iter().map(u32::to_string).collect();
    let script = common::repo("tools/gguf/llama_cpp_greedy.py");
    let out = run_json(
        &python,
        &[
            script.to_str().unwrap(),
            w.join("model.gguf").to_str().unwrap(),
            "--text",
            prompt,
            "--ids",
            &ids_s.join(","),
            "--n",
            &n.to_string(),
        ],
    );
    let theirs: Vec<u32> = serde_json::from_value(out["tokens"].clone()).unwrap();
    assert_eq!(theirs, ids, "llama.cpp's tokenization");
    let mut cont: Vec<u32> = serde_json::from_value(out["continuation"].clone()).unwrap();
    // handgrad stops at the end of text; llama.cpp's loop goes on.
    if let Some(end) = cont.iter().position(|&t| tok.stop_ids().contains(&t)) {
        cont.truncate(end);
    }
    let mut all = ids.clone();
    all.extend_from_slice(&cont);
    let text = tok.decode(&all).unwrap();
    assert_eq!(
        text.trim_end(),
        generated.trim_end(),
        "llama.cpp vs handgrad generate"
    );
    eprintln!("both: {text:?}");

    // A run trained with --vocab-compaction is refused in one line: its classifier only
    // learnt the kept ids, and llama.cpp would pick among all of them.
    ok(
        common::handgrad(
            &[
                "train",
                "--model",
                "tiny",
                "--steps",
                "2",
                "--vocab-compaction",
                "--run-dir",
                "compact",
                "--quiet",
            ],
            w,
        ),
        "train --vocab-compaction",
    );
    let o = common::handgrad(&["convert", "compact", "compact.gguf"], w);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("--vocab-compaction"), "{}", o.stderr);
    assert_eq!(o.stderr.trim().lines().count(), 2, "{}", o.stderr);
    assert!(!w.join("compact.gguf").exists());
}

/// The fuzz target's check (`handgrad::fuzzing::gguf_roundtrip`) over many random inputs
/// under plain `cargo test`: every model, dtype and weights written reads back.
#[test]
fn random_models_read_back_through_the_fuzz_check() {
    let n: usize = std::env::var("HANDGRAD_GGUF_ROUNDTRIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut rng = handgrad::util::rng::Rng::new(2027);
    for _ in 0..n {
        let len = 8 + (rng.next_u64() % 200) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        handgrad::fuzzing::gguf_roundtrip(&data);
    }
}
