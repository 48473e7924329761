//! Parity of LoRA adapters with Hugging Face PEFT, both ways:
//! * reading: adapters of known values on a tiny Llama and a tiny Qwen3, as written by
//!   `tools/golden/make_lora_parity.py` (torch + transformers + peft): handgrad loads PEFT's
//!   `adapter_config.json` and tensor names and matches its logits, masked loss, adapter
//!   gradients and merged weights;
//! * writing: an adapter that handgrad saves, loaded by `PeftModel.from_pretrained` over the
//!   base model handgrad exports, gives handgrad's logits (`tools/peft/check_adapter.py`; runs
//!   when Python has torch, transformers and peft, which `.ci/run` installs).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use handgrad::backend::{CpuKernels, IGNORE_TARGET};
use handgrad::formats::hf::ExportDtype;
use handgrad::formats::peft;
use handgrad::formats::safetensors::SafetensorsFile;
use handgrad::model::{Adapters, Base, Batch, ModelConfig, Transformer};

struct Case {
    model: Transformer,
    base: Vec<f32>,
    adapter: peft::LoadedAdapter,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    file: SafetensorsFile,
    golden: PathBuf,
}

/// The golden case, its adapter read the way a user's PEFT folder is read: the golden file as
/// `adapter_model.safetensors` (it also holds other tensors, which the reader ignores) beside
/// the `adapter_config.json` PEFT wrote.
fn load(name: &str, dir: &Path) -> Case {
    let golden = common::repo(&format!("tests/golden/lora_{name}.safetensors"));
    let file = SafetensorsFile::open(&golden).unwrap();
    let meta = file.metadata().unwrap();
    let config_json: serde_json::Value = serde_json::from_str(&meta["config"]).unwrap();
    let cfg = ModelConfig::from_hf_json(&config_json, name).unwrap();
    let model = Transformer::new(cfg);
    let mut base = vec![0.0f32; model.layout.total()];
    for t in &model.layout.tensors {
        file.read_f32_into(&t.name, &t.shape, &mut base[t.range()])
            .unwrap();
    }
    std::fs::write(dir.join(peft::CONFIG_FILE), &meta["adapter_config"]).unwrap();
    std::fs::copy(&golden, dir.join(peft::WEIGHTS_FILE)).unwrap();
    let adapter = peft::load(dir, &model.cfg).unwrap();
    // HF shifts the labels inside the model: position i predicts labels[i + 1]; -100 and the
    // last position take no part.
    let (_, ids) = file.read_i64("input_ids").unwrap();
    let (_, labels) = file.read_i64("labels").unwrap();
    let inputs: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let targets: Vec<u32> = (0..ids.len())
        .map(|i| match labels.get(i + 1) {
            Some(&l) if l >= 0 => l as u32,
            _ => IGNORE_TARGET,
        })
        .collect();
    Case {
        model,
        base,
        adapter,
        inputs,
        targets,
        file,
        golden,
    }
}

fn rel_diff(reference: &[f32], ours: &[f32]) -> f64 {
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
    diff / norm.max(1e-30)
}

fn check(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let c = load(name, dir.path());
    let k = CpuKernels;
    let seq = c.inputs.len();
    let lay = &c.adapter.layout;
    assert_eq!(lay.cfg.rank, 4);
    assert_eq!(lay.cfg.targets.len(), 7);
    let adapters = Adapters {
        layout: lay,
        params: &c.adapter.params,
        dropout_seed: None,
    };
    let mut acts = c.model.activations_adapted(&k, lay, 1, seq);

    // Logits within 1e-4 absolute.
    c.model
        .forward_adapted(&k, Base::F32(&c.base), &adapters, &mut acts, &c.inputs)
        .unwrap();
    let (_, ref_logits) = c.file.read_f32("logits").unwrap();
    let max_diff = ref_logits
        .iter()
        .zip(&acts.logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("{name}: logits within {max_diff:.2e} of PEFT's");
    assert!(max_diff < 1e-4, "{name}: logits differ by {max_diff}");

    // The masked loss within 1e-4, the adapters' gradients within 1e-3 of their norm.
    let batch = Batch {
        inputs: &c.inputs,
        targets: &c.targets,
    };
    let mut grads = vec![0.0f32; lay.total()];
    let loss = c
        .model
        .forward_backward_adapted(
            &k,
            Base::F32(&c.base),
            &adapters,
            &mut grads,
            &mut acts,
            batch,
            1.0,
        )
        .unwrap();
    let (_, ref_loss) = c.file.read_f32("loss").unwrap();
    assert!(
        (loss - ref_loss[0] as f64).abs() < 1e-4,
        "{name}: loss {loss} vs PEFT's {}",
        ref_loss[0]
    );
    for t in &lay.tensors {
        let (_, reference) = c.file.read_f32(&format!("grad.{}", t.name)).unwrap();
        let d = rel_diff(&reference, &grads[t.range()]);
        assert!(
            d < 1e-3,
            "{name}: gradient of {} off by {d:.2e} of its norm",
            t.name
        );
    }

    // Merged weights equal merge_and_unload's.
    let merged = c.adapter.merge_into(&c.model.cfg, &c.base);
    let mut checked = 0;
    for t in &c.model.layout.tensors {
        let Ok((_, reference)) = c.file.read_f32(&format!("merged.{}", t.name)) else {
            continue;
        };
        let worst = reference
            .iter()
            .zip(&merged[t.range()])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "{name}: merged {} off by {worst}", t.name);
        checked += 1;
    }
    assert_eq!(
        checked, 14,
        "{name}: every adapted matrix has a merged reference"
    );

    check_peft_loads_ours(name, &c);
}

/// A Python with torch, transformers and peft (`HANDGRAD_PYTHON`, default `python3`), or
/// `None` after saying why the check is skipped.
fn python_with_peft() -> Option<String> {
    let python = std::env::var("HANDGRAD_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import torch, transformers, peft"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Some(python)
    } else {
        common::skip(&format!(
            "{python} lacks torch, transformers or peft (pip install torch transformers peft): PEFT loading handgrad's adapter is not checked"
        ));
        None
    }
}

/// handgrad writes the base model (Hugging Face folder), the adapter (PEFT folder), the merged
/// model and its own logits; PEFT loads them and must compute the same logits.
fn check_peft_loads_ours(name: &str, c: &Case) {
    let Some(python) = python_with_peft() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let (base_dir, adapter_dir, merged_dir) = (
        work.path().join("base"),
        work.path().join("adapter"),
        work.path().join("merged"),
    );
    let cfg = &c.model.cfg;
    handgrad::formats::hf::save(&base_dir, cfg, &c.base, ExportDtype::F32, None, u64::MAX).unwrap();
    peft::save(
        &adapter_dir,
        cfg,
        &c.adapter.layout,
        &c.adapter.params,
        Some("base"),
    )
    .unwrap();
    let merged = c.adapter.merge_into(cfg, &c.base);
    handgrad::formats::hf::save(&merged_dir, cfg, &merged, ExportDtype::F32, None, u64::MAX)
        .unwrap();
    // handgrad's logits for the golden ids.
    let k = CpuKernels;
    let adapters = Adapters {
        layout: &c.adapter.layout,
        params: &c.adapter.params,
        dropout_seed: None,
    };
    let mut acts = c
        .model
        .activations_adapted(&k, &c.adapter.layout, 1, c.inputs.len());
    c.model
        .forward_adapted(&k, Base::F32(&c.base), &adapters, &mut acts, &c.inputs)
        .unwrap();
    let expect = work.path().join("expect.safetensors");
    write_expect(&expect, &c.inputs, &acts.logits, cfg.vocab_size);
    let out = Command::new(&python)
        .arg(common::repo("tools/peft/check_adapter.py"))
        .arg("--base")
        .arg(&base_dir)
        .arg("--adapter")
        .arg(&adapter_dir)
        .arg("--expect")
        .arg(&expect)
        .arg("--merged")
        .arg(&merged_dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{name} ({}): {text}", c.golden.display());
    assert!(
        out.status.success(),
        "{name}: PEFT disagrees with handgrad's adapter:\n{text}"
    );
}

/// `input_ids` (int64 [1, T]) and `logits` (float32 [1, T, V]).
fn write_expect(path: &Path, ids: &[u32], logits: &[f32], vocab: usize) {
    use safetensors::tensor::{Dtype, TensorView};
    let ids: Vec<u8> = ids.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect();
    let lg: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
    let t = ids.len() / 8;
    let views = vec![
        (
            "input_ids",
            TensorView::new(Dtype::I64, vec![1, t], &ids).unwrap(),
        ),
        (
            "logits",
            TensorView::new(Dtype::F32, vec![1, t, vocab], &lg).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn llama_adapter_matches_peft() {
    check("llama_gqa");
}

#[test]
fn qwen3_adapter_matches_peft() {
    check("qwen3_hd");
}
