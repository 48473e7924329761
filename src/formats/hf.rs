//! Hugging Face model folders: `config.json` + `model.safetensors` (or sharded
//! `model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`) with HF tensor names,
//! for `LlamaForCausalLM` and `Qwen3ForCausalLM`. Reads f32/f16/bf16/f64 tensors; writes f32 or
//! bf16.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::safetensors::SafetensorsFile;
use super::{LoadedModel, TokenizerFile};
use crate::error::{Error, Result};
use crate::model::config::RopeStyle;
use crate::model::rope_layout::convert_rope_style;
use crate::model::{ModelConfig, ParamLayout};
use crate::util::fsutil::{create_dir_all, write_atomic};

/// Element type of exported tensors (`--dtype`; the names are matched without regard to
/// case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportDtype {
    #[value(name = "f32", alias = "fp32", alias = "float32")]
    F32,
    #[value(name = "bf16", alias = "bfloat16")]
    Bf16,
}

impl ExportDtype {
    /// Parses `f32` / `bf16` (and `fp32`, `float32`, `bfloat16`), in any case.
    pub fn parse(s: &str) -> Result<Self> {
        <Self as clap::ValueEnum>::from_str(s, true).map_err(|_| {
            Error::invalid(format!(
                "unknown --dtype '{}' (f32 or bf16)",
                s.to_ascii_lowercase()
            ))
        })
    }
    fn safetensors_name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "F32",
            ExportDtype::Bf16 => "BF16",
        }
    }
    fn bytes(self) -> usize {
        match self {
            ExportDtype::F32 => 4,
            ExportDtype::Bf16 => 2,
        }
    }
    fn torch_name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "float32",
            ExportDtype::Bf16 => "bfloat16",
        }
    }
}

/// The safetensors files of a folder: the index's shards, `model.safetensors`, or every
/// `.safetensors` file.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io("reading", &index, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::json(format!("parsing {}", index.display()), e))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::format(&index, "no \"weight_map\" object"))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        return files
            .into_iter()
            .map(|f| {
                if f.contains("..") || f.contains('/') || f.contains('\\') {
                    Err(Error::format(
                        &index,
                        format!("shard name '{f}' points outside the folder"),
                    ))
                } else {
                    Ok(dir.join(f))
                }
            })
            .collect();
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io("listing", dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::format(
            dir,
            "no model.safetensors (or safetensors shards) in this folder; PyTorch .bin weights are not supported",
        ));
    }
    Ok(files)
}

/// Loads a Hugging Face folder, or a `.safetensors` file with `config.json` beside it.
pub fn load(path: &Path) -> Result<LoadedModel> {
    let (dir, files) = if path.is_dir() {
        (path.to_path_buf(), weight_files(path)?)
    } else {
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        (dir, vec![path.to_path_buf()])
    };
    let cfg = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    let layout = ParamLayout::new(&cfg);
    let mut params = vec![0.0f32; layout.total()];
    let mut found = vec![false; layout.tensors.len()];
    let mut warnings = Vec::new();
    let mut dtypes = BTreeMap::new();
    for f in &files {
        let st = SafetensorsFile::open(f)?;
        for name in st.names() {
            match layout.find(&name) {
                Some(id) => {
                    let t = &layout.tensors[id];
                    st.read_f32_into(&name, &t.shape, &mut params[t.range()])?;
                    found[id] = true;
                    if let Some((_, dt)) = st.info(&name) {
                        *dtypes.entry(format!("{dt:?}")).or_insert(0usize) += 1;
                    }
                }
                None if name == "lm_head.weight" && cfg.tie_embeddings => {}
                None if name.ends_with("rotary_emb.inv_freq") => {}
                None => warnings.push(format!("ignored tensor '{name}' in {}", f.display())),
            }
        }
    }
    if let Some(missing) = layout.tensors.iter().zip(&found).find(|(_, f)| !**f) {
        return Err(Error::format(
            &dir,
            format!("tensor '{}' is missing from the weights", missing.0.name),
        ));
    }
    let tokenizer = TokenizerFile::find(&dir)?;
    let dtype_list: Vec<String> = dtypes.iter().map(|(k, v)| format!("{v} {k}")).collect();
    Ok(LoadedModel {
        cfg,
        params,
        tokenizer,
        format: format!(
            "Hugging Face safetensors ({} file(s); {})",
            files.len(),
            dtype_list.join(", ")
        ),
        warnings,
        vocab_kept: None,
    })
}

/// Writes the tensors of one shard.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &[(&str, &[usize], &[f32])],
    dtype: ExportDtype,
) -> Result<u64> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut sorted: Vec<&(&str, &[usize], &[f32])> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut offset = 0usize;
    for (name, shape, data) in &sorted {
        let n = data.len() * dtype.bytes();
        header.insert(
            name.to_string(),
            json!({"dtype": dtype.safetensors_name(), "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut h = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| Error::json("writing a safetensors header", e))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    write_atomic(path, |f| {
        f.write_all(&(h.len() as u64).to_le_bytes())?;
        f.write_all(&h)?;
        let mut buf = Vec::with_capacity(1 << 16);
        for (_, _, data) in &sorted {
            for chunk in data.chunks(1 << 14) {
                buf.clear();
                for &x in chunk {
                    match dtype {
                        ExportDtype::F32 => buf.extend_from_slice(&x.to_le_bytes()),
                        ExportDtype::Bf16 => {
                            buf.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes())
                        }
                    }
                }
                f.write_all(&buf)?;
            }
        }
        Ok(())
    })?;
    Ok((8 + h.len() + offset) as u64)
}

/// Writes a Hugging Face folder (`config.json`, weights, and the tokenizer file if given).
/// Interleaved-RoPE models are converted to rotate-half on the way out, so transformers runs
/// them unchanged. Weights above `max_shard_bytes` are split into shards with an index.
pub fn save(
    dir: &Path,
    cfg: &ModelConfig,
    params: &[f32],
    dtype: ExportDtype,
    tokenizer: Option<&TokenizerFile>,
    max_shard_bytes: u64,
) -> Result<()> {
    create_dir_all(dir)?;
    let mut cfg = cfg.clone();
    let layout = ParamLayout::new(&cfg);
    let mut owned;
    let params = if cfg.rope_style == RopeStyle::Interleaved {
        owned = params.to_vec();
        convert_rope_style(&mut cfg, &layout, &mut owned, RopeStyle::RotateHalf);
        &owned[..]
    } else {
        params
    };
    let mut config = cfg.to_hf_json();
    config["torch_dtype"] = json!(dtype.torch_name());
    let text =
        serde_json::to_vec_pretty(&config).map_err(|e| Error::json("writing config.json", e))?;
    write_atomic(&dir.join("config.json"), |f| f.write_all(&text))?;

    // Greedy sharding in layout order.
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (i, t) in layout.tensors.iter().enumerate() {
        let bytes = (t.len() * dtype.bytes()) as u64;
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        if let Some(last) = shards.last_mut() {
            last.push(i);
        }
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (k, ids) in shards.iter().enumerate() {
        let name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", k + 1)
        };
        let tensors: Vec<(&str, &[usize], &[f32])> = ids
            .iter()
            .map(|&i| {
                let t = &layout.tensors[i];
                (t.name.as_str(), t.shape.as_slice(), &params[t.range()])
            })
            .collect();
        write_safetensors(&dir.join(&name), &tensors, dtype)?;
        for &i in ids {
            let t = &layout.tensors[i];
            weight_map.insert(t.name.clone(), json!(name));
            total += (t.len() * dtype.bytes()) as u64;
        }
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let text =
            serde_json::to_vec_pretty(&index).map_err(|e| Error::json("writing the index", e))?;
        write_atomic(&dir.join("model.safetensors.index.json"), |f| {
            f.write_all(&text)
        })?;
    }
    if let Some(t) = tokenizer {
        write_atomic(&dir.join(&t.name), |f| f.write_all(&t.bytes))?;
    }
    Ok(())
}
