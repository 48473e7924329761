//! Entry points for fuzzing every parser that reads what a user or a file controls. Each takes
//! arbitrary bytes, runs the real reader on them and must return — with a value or an error,
//! never a panic, an abort or an allocation the input's size does not justify.
//!
//! The `cargo fuzz` targets in `fuzz/` call these, and `tests/fuzz_corpora.rs` replays the
//! committed corpora and every crash found through them, so plain `cargo test` keeps them
//! fixed. Readers that take a path get the bytes in a temporary file (`TMPDIR`; point it at
//! `/dev/shm` when fuzzing).

use std::cell::RefCell;
use std::path::{Path, PathBuf};

/// A fuzz entry point.
pub type Target = fn(&[u8]);

/// Every target: its name (the `fuzz/fuzz_targets/NAME.rs` and `fuzz/corpus/NAME/` folder) and
/// entry point.
pub const TARGETS: &[(&str, Target)] = &[
    ("tokenizer_bin", tokenizer_bin),
    ("tokenizer_json", tokenizer_json),
    ("checkpoint", checkpoint),
    ("token_shard", token_shard),
    ("safetensors", safetensors),
    ("gguf", gguf),
    ("gguf_roundtrip", gguf_roundtrip),
    ("llama2c", llama2c),
    ("config_json", config_json),
    ("events_jsonl", events_jsonl),
    ("mil", mil),
];

thread_local! {
    static SCRATCH: RefCell<Option<PathBuf>> = const { RefCell::new(None) };
}

/// Runs `f` on a file holding `data`, named `name` in a per-thread scratch folder.
fn with_file<T>(name: &str, data: &[u8], f: impl FnOnce(&Path) -> T) -> Option<T> {
    let path: PathBuf = SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.is_none() {
            let d = std::env::temp_dir().join(format!(
                "handgrad-fuzz-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            *s = std::fs::create_dir_all(&d).ok().map(|_| d);
        }
        s.as_ref().map(|d| d.join(name))
    })?;
    std::fs::write(&path, data).ok()?;
    Some(f(&path))
}

/// A llama2.c `tokenizer.bin`: load, then encode and decode a little text.
pub fn tokenizer_bin(data: &[u8]) {
    use crate::tokenizer::Tokenizer;
    if let Ok(t) = crate::tokenizer::llama2c::Llama2cTokenizer::from_bytes(
        data.to_vec(),
        Path::new("fuzz/tokenizer.bin"),
    ) {
        exercise(&t);
    }
    fn exercise(t: &dyn Tokenizer) {
        if let Ok(ids) = t.encode("Once upon a time, Lily saw a cat. \u{1F600}") {
            let _ = t.decode(&ids);
        }
        let n = t.vocab_size() as u32;
        let _ = t.decode(&[0, 1, 2, n.saturating_sub(1), n, u32::MAX]);
    }
}

/// A Hugging Face `tokenizer.json` (through the `tokenizers` crate and our checks of it).
pub fn tokenizer_json(data: &[u8]) {
    if let Ok(t) = crate::tokenizer::hf::HfTokenizer::from_bytes(
        data.to_vec(),
        Path::new("fuzz/tokenizer.json"),
    ) {
        use crate::tokenizer::Tokenizer;
        if let Ok(ids) = t.encode("Once upon a time") {
            let _ = t.decode(&ids);
        }
        let _ = t.decode(&[0, u32::MAX]);
    }
}

/// A handgrad checkpoint.
pub fn checkpoint(data: &[u8]) {
    let _ = with_file("checkpoint", data, |p| {
        crate::formats::checkpoint::Checkpoint::load(p).map(|c| c.params.len())
    });
}

/// A token shard (header, size check, then every token read).
pub fn token_shard(data: &[u8]) {
    let _ = with_file("train-00000.bin", data, |p| {
        if let Ok(s) = crate::data::shards::TokenShard::open(p) {
            let mut sum = 0u64;
            for i in 0..s.len() {
                sum = sum.wrapping_add(s.get(i) as u64);
            }
            std::hint::black_box(sum);
        }
    });
}

/// A `.safetensors` file: header, then every tensor read as f32.
pub fn safetensors(data: &[u8]) {
    let _ = with_file("model.safetensors", data, |p| {
        if let Ok(f) = crate::formats::safetensors::SafetensorsFile::open(p) {
            for name in f.names() {
                let _ = f.read_f32(&name);
            }
        }
    });
}

/// A GGUF file: header, metadata and tensor table, then the model built from it.
pub fn gguf(data: &[u8]) {
    let _ = with_file("model.gguf", data, |p| {
        if let Ok(f) = crate::formats::gguf::GgufFile::open(p) {
            for name in f.tensors.keys() {
                let _ = f.read_f32(name, p);
            }
            let _ = crate::formats::gguf::load(p);
        }
    });
}

/// The GGUF writer and reader as a pair: the bytes choose a small Llama or Qwen3 (shape,
/// tying, RoPE pairing), an element type and the weights; what [`crate::formats::gguf::save`]
/// writes, [`crate::formats::gguf::load`] must read back as the same configuration and the
/// same weights, exactly in F32 and within the type's rounding otherwise (F16 and BF16 half an
/// ulp, Q8_0 half a block step plus the f16 rounding of the block's scale). Panics otherwise.
pub fn gguf_roundtrip(data: &[u8]) {
    use crate::formats::gguf::{self, GgufDtype, write::Extras};
    use crate::model::config::{Architecture, RopeStyle};
    use crate::model::rope_layout::convert_rope_style;
    use crate::model::{ModelConfig, ParamLayout};
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let byte = |i: usize| rest.get(i).copied().unwrap_or(0) as usize;
    let Ok(mut cfg) = ModelConfig::preset("tiny") else {
        return;
    };
    cfg.arch = if head & 1 == 0 {
        Architecture::Llama
    } else {
        Architecture::Qwen3
    };
    let dtype = [
        GgufDtype::F32,
        GgufDtype::F16,
        GgufDtype::Bf16,
        GgufDtype::Q8_0,
    ][(head as usize >> 1) & 3];
    cfg.tie_embeddings = head & 8 != 0;
    cfg.rope_style = if head & 16 != 0 {
        RopeStyle::Interleaved
    } else {
        RopeStyle::RotateHalf
    };
    cfg.n_layers = 1 + byte(0) % 2;
    cfg.n_kv_heads = 1 + byte(1) % 2;
    cfg.n_heads = cfg.n_kv_heads * (1 + byte(2) % 2);
    cfg.head_dim = 2 * (1 + byte(3) % 8);
    cfg.dim = match cfg.arch {
        Architecture::Llama => cfg.n_heads * cfg.head_dim,
        Architecture::Qwen3 => 8 * (1 + byte(4) % 8),
    };
    cfg.ffn_dim = 1 + byte(5) % 80;
    cfg.vocab_size = 2 + byte(6) % 70;
    if head & 32 != 0 {
        cfg.bos_token_id = Some(1);
        cfg.eos_token_id = Some(0);
    }
    if cfg.validate("fuzz").is_err() {
        return;
    }
    let layout = ParamLayout::new(&cfg);
    let values = &rest[7.min(rest.len())..];
    let params: Vec<f32> = (0..layout.total())
        .map(|i| match values.get(i % values.len().max(1)) {
            // Zeros, small and ordinary magnitudes, and their signs.
            Some(&b) => (b as i8) as f32 * [1e-3, 0.05, 1.0, 0.0][(i / 7) % 4],
            None => 0.0,
        })
        .collect();
    let _ = with_file("roundtrip.gguf", &[], |path| {
        gguf::save(path, &cfg, &params, dtype, &Extras::default())
            .unwrap_or_else(|e| panic!("writing {cfg:?} as {dtype:?}: {e}"));
        let m = gguf::load(path).unwrap_or_else(|e| panic!("reading back {cfg:?}: {e}"));
        let mut want_cfg = cfg.clone();
        let mut want = params.clone();
        convert_rope_style(&mut want_cfg, &layout, &mut want, m.cfg.rope_style);
        assert_eq!(m.cfg, want_cfg, "configuration read back");
        for t in &layout.tensors {
            let matrix = t.shape.len() == 2;
            let q8 = matrix && dtype == GgufDtype::Q8_0 && t.shape[1] % 32 == 0;
            let r = t.range();
            for (blk_w, blk_r) in want[r.clone()].chunks(32).zip(m.params[r].chunks(32)) {
                let amax = blk_w.iter().fold(0.0f32, |a, x| a.max(x.abs()));
                for (&x, &y) in blk_w.iter().zip(blk_r) {
                    let bound = if !matrix || dtype == GgufDtype::F32 {
                        0.0
                    } else if q8 {
                        (amax / 127.0) * (0.5 + 127.0 * 2f32.powi(-11)) * (1.0 + 1e-5)
                            + 127.0 * 2f32.powi(-25)
                    } else if dtype == GgufDtype::Bf16 {
                        x.abs() * 2f32.powi(-8)
                    } else {
                        (x.abs() * 2f32.powi(-11)).max(2f32.powi(-25))
                    };
                    assert!(
                        (x - y).abs() <= bound,
                        "{}: wrote {x}, read {y} ({dtype:?})",
                        t.name
                    );
                }
            }
        }
    });
}

/// A llama2.c model file (legacy v0, v1, v2).
pub fn llama2c(data: &[u8]) {
    let _ = with_file("model.bin", data, |p| {
        crate::formats::llama2c::load(p).map(|m| m.params.len())
    });
}

/// A Hugging Face `config.json`.
pub fn config_json(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data)
        && let Ok(cfg) = crate::model::ModelConfig::from_hf_json(&v, "fuzz/config.json")
    {
        let _ = cfg.param_counts();
        let _ = cfg.to_hf_json();
    }
}

/// An `events.jsonl` log.
pub fn events_jsonl(data: &[u8]) {
    let _ = with_file("events.jsonl", data, |p| {
        if let Ok(log) = crate::telemetry::reader::read_file(p) {
            let _ = crate::dashboard::state::RunView::from_records(&log.records);
        }
    });
}

/// A MIL program's text, then lint over it.
pub fn mil(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = crate::backend::ane::mil::parse::parse(text) {
        let files = crate::backend::ane::mil::ProgramFiles {
            text: text.to_string(),
            blobs: Vec::new(),
        };
        let _ = crate::backend::ane::lint::lint(&p, &files);
    }
}
