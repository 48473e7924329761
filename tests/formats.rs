//! Model files in and out: Hugging Face folders (f32 and bf16, sharded), llama2.c v0/v1/v2 and
//! GGUF, against logits computed by transformers (`tools/golden/make_format_files.py`).

mod common;

use std::path::PathBuf;

use handgrad::backend::CpuKernels;
use handgrad::formats::hf::ExportDtype;
use handgrad::formats::safetensors::SafetensorsFile;
use handgrad::formats::{LoadedModel, hf, llama2c, load_model};
use handgrad::model::{RopeStyle, Transformer};

fn golden(rel: &str) -> PathBuf {
    common::repo(&format!("tests/golden/formats/{rel}"))
}

fn reference(case: &str, key: &str) -> (Vec<u32>, Vec<f32>) {
    let f = SafetensorsFile::open(&golden(&format!("reference_{case}.safetensors"))).unwrap();
    let (_, ids) = f.read_i64("input_ids").unwrap();
    let (_, logits) = f.read_f32(key).unwrap();
    (ids.iter().map(|&x| x as u32).collect(), logits)
}

fn logits_of(m: &LoadedModel, ids: &[u32]) -> Vec<f32> {
    let model = Transformer::new(m.cfg.clone());
    let mut acts = model.activations(&CpuKernels, 1, ids.len());
    model
        .forward(&CpuKernels, &m.params, &mut acts, ids)
        .unwrap();
    acts.logits
}

fn assert_logits(m: &LoadedModel, case: &str, key: &str) {
    let (ids, want) = reference(case, key);
    let got = logits_of(m, &ids);
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst < 1e-4,
        "{case}/{key} via {}: logits differ by {worst}",
        m.format
    );
}

#[test]
fn hugging_face_folders_match_transformers() {
    for case in ["llama_gqa", "llama_tied", "qwen3_hd"] {
        let m = load_model(&golden(&format!("hf_{case}"))).unwrap();
        assert_eq!(m.cfg.rope_style, RopeStyle::RotateHalf);
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
        assert_logits(&m, case, "logits");
    }
    let m = load_model(&golden("hf_qwen3_hd_bf16")).unwrap();
    assert!(m.format.contains("BF16"), "{}", m.format);
    assert_logits(&m, "qwen3_hd", "logits_bf16");
}

#[test]
fn gguf_files_match_transformers() {
    let m = load_model(&golden("llama_gqa.gguf")).unwrap();
    assert_eq!(m.cfg.rope_style, RopeStyle::Interleaved);
    assert!(!m.cfg.tie_embeddings);
    assert!(m.format.contains("F16"), "{}", m.format);
    assert_logits(&m, "llama_gqa", "logits_f16");
    let m = load_model(&golden("qwen3_hd.gguf")).unwrap();
    assert_eq!((m.cfg.head_dim, m.cfg.rope_theta), (10, 1e6));
    assert!(m.cfg.tie_embeddings && m.cfg.qk_norm());
    assert_logits(&m, "qwen3_hd", "logits_f16");
}

#[test]
fn llama2c_files_match_the_hf_copy_of_the_same_weights() {
    let m = load_model(&golden("llama2c_llama_gqa.bin")).unwrap();
    assert!(
        !m.cfg.tie_embeddings && m.cfg.n_kv_heads == 2,
        "negative vocab = untied classifier"
    );
    assert_logits(&m, "llama_gqa", "logits");
    let m = load_model(&golden("llama2c_llama_tied.bin")).unwrap();
    assert_eq!(m.format, "llama2.c v0");
    assert_logits(&m, "llama_tied", "logits");
    let m = load_model(&golden("llama2c_v1_llama_tied.bin")).unwrap();
    assert_eq!(m.format, "llama2.c v1");
    assert_logits(&m, "llama_tied", "logits");
    let m = load_model(&golden("llama2c_v2_llama_tied.bin")).unwrap();
    assert!(m.format.starts_with("llama2.c v2"));
    assert_logits(&m, "llama_tied", "logits_q80");
}

#[test]
fn llama2c_v2_written_by_handgrad_is_byte_identical_to_the_reference_exporter() {
    // The golden file was quantised by PyTorch in the layout of llama2.c's export.py (each
    // matrix's int8 values, then its scales), which runq.c maps.
    let m = load_model(&golden("hf_llama_tied")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("v2.bin");
    llama2c::save(&out, &m.cfg, &m.params, 2).unwrap();
    let ours = std::fs::read(&out).unwrap();
    let reference = std::fs::read(golden("llama2c_v2_llama_tied.bin")).unwrap();
    assert_eq!(ours.len(), reference.len());
    assert!(
        ours == reference,
        "v2 bytes differ from the reference exporter's"
    );
    // Read back: the dequantised weights, requantised, give the same file again.
    let back = load_model(&out).unwrap();
    assert_eq!(back.format, "llama2.c v2 (Q8_0, group 8)");
    let again = dir.path().join("again.bin");
    llama2c::save(&again, &back.cfg, &back.params, 2).unwrap();
    assert!(
        std::fs::read(&again).unwrap() == ours,
        "requantising is not exact"
    );
    assert_logits(&back, "llama_tied", "logits_q80");
}

/// Every tensor's raw bytes in a safetensors file.
fn tensor_bytes(
    path: &std::path::Path,
) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let f = SafetensorsFile::open(path).unwrap();
    f.names()
        .into_iter()
        .map(|n| {
            let v = f.read_f32(&n).unwrap();
            (n, v)
        })
        .collect()
}

#[test]
fn hf_export_is_tensor_identical_and_llama2c_converts_exactly() {
    let dir = tempfile::tempdir().unwrap();
    for case in ["llama_gqa", "llama_tied", "qwen3_hd"] {
        let src = golden(&format!("hf_{case}"));
        let m = load_model(&src).unwrap();
        let out = dir.path().join(case);
        hf::save(&out, &m.cfg, &m.params, ExportDtype::F32, None, u64::MAX).unwrap();
        let a = tensor_bytes(&src.join("model.safetensors"));
        let b = tensor_bytes(&out.join("model.safetensors"));
        assert_eq!(a.len(), b.len(), "{case}: tensor names");
        for (name, (shape, data)) in &a {
            let (s2, d2) = &b[name];
            assert_eq!(shape, s2, "{name}");
            assert!(
                data.iter().zip(d2).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{case}: {name} differs"
            );
        }
        let back = load_model(&out).unwrap();
        assert_eq!(back.cfg, m.cfg);
    }
    // llama2.c (interleaved) -> HF (rotate-half): the permutation reproduces the HF tensors bit for bit.
    let m = load_model(&golden("llama2c_llama_gqa.bin")).unwrap();
    let out = dir.path().join("from_llama2c");
    hf::save(&out, &m.cfg, &m.params, ExportDtype::F32, None, u64::MAX).unwrap();
    let a = tensor_bytes(&golden("hf_llama_gqa/model.safetensors"));
    let b = tensor_bytes(&out.join("model.safetensors"));
    for (name, (_, data)) in &a {
        assert!(
            data.iter()
                .zip(&b[name].1)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} differs"
        );
    }
    // HF -> llama2.c v0 and v1 -> back: the same parameters.
    let m = load_model(&golden("hf_llama_gqa")).unwrap();
    for version in [0, 1] {
        let p = dir.path().join(format!("model_v{version}.bin"));
        llama2c::save(&p, &m.cfg, &m.params, version).unwrap();
        let back = load_model(&p).unwrap();
        let mut cfg = m.cfg.clone();
        let mut params = m.params.clone();
        let layout = handgrad::model::ParamLayout::new(&cfg);
        handgrad::model::rope_layout::convert_rope_style(
            &mut cfg,
            &layout,
            &mut params,
            RopeStyle::Interleaved,
        );
        assert_eq!(back.params, params, "v{version}");
        assert_logits(&back, "llama_gqa", "logits");
    }
    assert_eq!(
        std::fs::metadata(dir.path().join("model_v0.bin"))
            .unwrap()
            .len(),
        std::fs::metadata(golden("llama2c_llama_gqa.bin"))
            .unwrap()
            .len()
    );
}

#[test]
fn bf16_and_sharded_exports_reload() {
    let dir = tempfile::tempdir().unwrap();
    let m = load_model(&golden("hf_qwen3_hd")).unwrap();
    let out = dir.path().join("sharded");
    hf::save(&out, &m.cfg, &m.params, ExportDtype::F32, None, 20_000).unwrap();
    assert!(out.join("model.safetensors.index.json").exists());
    assert!(
        out.join("model-00001-of-00003.safetensors").exists(),
        "{:?}",
        std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect::<Vec<_>>()
    );
    let back = load_model(&out).unwrap();
    assert_eq!(back.params, m.params);
    let out = dir.path().join("bf16");
    hf::save(&out, &m.cfg, &m.params, ExportDtype::Bf16, None, u64::MAX).unwrap();
    let back = load_model(&out).unwrap();
    for (a, b) in back.params.iter().zip(&m.params) {
        assert_eq!(*a, half::bf16::from_f32(*b).to_f32());
    }
    assert_logits(&back, "qwen3_hd", "logits_bf16");
}

#[test]
fn damaged_model_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let src = golden("hf_llama_tied");
    let good = std::fs::read(src.join("model.safetensors")).unwrap();
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    let case = |name: &str, weights: &[u8], config: &str| -> String {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("model.safetensors"), weights).unwrap();
        std::fs::write(d.join("config.json"), config).unwrap();
        load_model(&d).map(|_| ()).unwrap_err().to_string()
    };
    // Truncated.
    let e = case("truncated", &good[..good.len() - 10], &config);
    assert!(e.contains("invalid safetensors"), "{e}");
    // Header length larger than the file.
    let mut big = good.clone();
    big[..8].copy_from_slice(&(good.len() as u64 * 2).to_le_bytes());
    let e = case("header", &big, &config);
    assert!(
        e.contains("header length") && e.contains("larger than the file"),
        "{e}"
    );
    // Shapes that do not match the config.
    let e = case(
        "shape",
        &good,
        &config.replace("\"intermediate_size\": 40", "\"intermediate_size\": 41"),
    );
    assert!(e.contains("shape") && e.contains("mlp"), "{e}");
    // Unknown dtype: rewrite one tensor's dtype in the header to I8 (same byte count x4).
    let hlen = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(good[8..8 + hlen].to_vec()).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&header).unwrap();
    let entry = v.get_mut("model.norm.weight").unwrap();
    entry["dtype"] = serde_json::json!("I32");
    let mut h2 = serde_json::to_vec(&v).unwrap();
    while !h2.len().is_multiple_of(8) {
        h2.push(b' ');
    }
    let mut bad = (h2.len() as u64).to_le_bytes().to_vec();
    bad.extend_from_slice(&h2);
    bad.extend_from_slice(&good[8 + hlen..]);
    let e = case("dtype", &bad, &config);
    assert!(e.contains("I32") && e.contains("model.norm.weight"), "{e}");
    // A truncated llama2.c file.
    let l = std::fs::read(golden("llama2c_llama_tied.bin")).unwrap();
    let p = dir.path().join("cut.bin");
    std::fs::write(&p, &l[..l.len() - 4]).unwrap();
    let e = load_model(&p).unwrap_err().to_string();
    assert!(e.contains("size mismatch"), "{e}");
    // A truncated GGUF file.
    let g = std::fs::read(golden("qwen3_hd.gguf")).unwrap();
    let p = dir.path().join("cut.gguf");
    std::fs::write(&p, &g[..200]).unwrap();
    let e = load_model(&p).unwrap_err().to_string();
    assert!(e.contains("GGUF") && e.contains("truncated"), "{e}");
}
