//! LoRA adapters as Hugging Face PEFT saves them: a folder with `adapter_model.safetensors`
//! (PEFT's tensor names, `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`,
//! `lora_A [r, in]`, `lora_B [out, r]`) and `adapter_config.json`. What handgrad writes,
//! `PeftModel.from_pretrained(base, folder)` loads; what PEFT writes for a plain LoRA of a
//! Llama or Qwen3 model's linear projections, handgrad reads.
//!
//! A model that handgrad runs with interleaved RoPE pairs (llama2.c weights) is exported to
//! Hugging Face with its query/key rows permuted to the rotate-half pairing; its adapters' `B`
//! rows of `q_proj`/`k_proj` are permuted the same way here, so the adapter fits the exported
//! base model.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::Deserialize;
use serde_json::json;

use super::hf::{ExportDtype, write_safetensors};
use super::safetensors::SafetensorsFile;
use crate::error::{Error, Result};
use crate::model::config::RopeStyle;
use crate::model::lora::AdapterIds;
use crate::model::rope_layout::permute_rows;
use crate::model::{LoraConfig, LoraLayout, LoraTarget, ModelConfig};
use crate::util::fsutil::{create_dir_all, write_atomic};

/// The weights file of an adapter folder.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The configuration file of an adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// Whether `dir` looks like a PEFT adapter folder.
pub fn is_adapter_folder(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file()
}

/// `B` of `q_proj`/`k_proj` permuted between RoPE pairings (other adapters unchanged).
fn permute_qk_b(model: &ModelConfig, layout: &LoraLayout, params: &mut [f32], to: RopeStyle) {
    let r = layout.cfg.rank;
    for ids in &layout.layers {
        for (t, heads) in [
            (LoraTarget::Q, model.n_heads),
            (LoraTarget::K, model.n_kv_heads),
        ] {
            let Some(AdapterIds { b, .. }) = ids[t.index()] else {
                continue;
            };
            let range = layout.tensors[b].range();
            let p = permute_rows(&params[range.clone()], heads, model.head_dim, r, to);
            params[range].copy_from_slice(&p);
        }
    }
}

/// Writes the adapters `params` (laid out as `layout`, of a model of configuration `model`)
/// as a PEFT folder. `base` names the base model in `adapter_config.json`.
pub fn save(
    dir: &Path,
    model: &ModelConfig,
    layout: &LoraLayout,
    params: &[f32],
    base: Option<&str>,
) -> Result<()> {
    if params.len() != layout.total() {
        return Err(Error::invalid(format!(
            "expected {} adapter values, got {}",
            layout.total(),
            params.len()
        )));
    }
    create_dir_all(dir)?;
    let mut owned;
    let params = if model.rope_style == RopeStyle::Interleaved {
        owned = params.to_vec();
        permute_qk_b(model, layout, &mut owned, RopeStyle::RotateHalf);
        &owned[..]
    } else {
        params
    };
    let tensors: Vec<(&str, &[usize], &[f32])> = layout
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice(), &params[t.range()]))
        .collect();
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, ExportDtype::F32)?;
    let cfg = &layout.cfg;
    let alpha = if cfg.alpha.fract() == 0.0 {
        json!(cfg.alpha as i64)
    } else {
        json!(cfg.alpha)
    };
    let targets: Vec<&str> = cfg.targets.iter().map(|t| t.module()).collect();
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": cfg.rank,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let text = serde_json::to_vec_pretty(&config)
        .map_err(|e| Error::json("writing adapter_config.json", e))?;
    write_atomic(&dir.join(CONFIG_FILE), |f| f.write_all(&text))
}

/// `target_modules`: a list of module names, or one string (a name or `all-linear`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TargetModules {
    List(Vec<String>),
    One(String),
}

/// The fields of `adapter_config.json` handgrad reads; the others change nothing for a plain
/// LoRA, or are refused below when they would.
#[derive(Debug, Deserialize)]
struct AdapterConfigFile {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    target_modules: TargetModules,
    #[serde(default)]
    lora_dropout: f64,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
}

/// An adapter read from a PEFT folder.
#[derive(Debug, Clone)]
pub struct LoadedAdapter {
    pub layout: LoraLayout,
    pub params: Vec<f32>,
    /// The base model the adapter names, if it does.
    pub base: Option<String>,
}

impl LoadedAdapter {
    /// The base weights with this adapter merged in (`W + (alpha/r) B A`).
    pub fn merge_into(&self, model: &ModelConfig, base: &[f32]) -> Vec<f32> {
        let base_layout = crate::model::ParamLayout::new(model);
        self.layout.merge(&base_layout, base, &self.params)
    }
}

/// Reads a PEFT LoRA folder for a model of configuration `model`.
pub fn load(dir: &Path, model: &ModelConfig) -> Result<LoadedAdapter> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::format(
                dir,
                "not a PEFT adapter folder (no adapter_config.json; handgrad writes one in a LoRA run's adapter/ folder)",
            )
        } else {
            Error::io("reading", &cfg_path, e)
        }
    })?;
    let file: AdapterConfigFile = serde_json::from_str(&text)
        .map_err(|e| Error::format(&cfg_path, format!("not a LoRA adapter config: {e}")))?;
    let refuse = |why: &str| Err(Error::format(&cfg_path, why.to_string()));
    if file.peft_type.as_deref().is_some_and(|t| t != "LORA") {
        return refuse("only LoRA adapters are supported (peft_type is not LORA)");
    }
    if file.use_dora || file.use_rslora {
        return refuse("DoRA and rsLoRA adapters are not supported, only plain LoRA");
    }
    if file.bias.as_deref().is_some_and(|b| b != "none") {
        return refuse("adapters with trained biases (bias != \"none\") are not supported");
    }
    if file.fan_in_fan_out {
        return refuse(
            "fan_in_fan_out adapters (GPT-2 style Conv1D) do not apply to Llama or Qwen3",
        );
    }
    if file.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
        return refuse(
            "the adapter also saves whole modules (modules_to_save), which handgrad does not load",
        );
    }
    if file
        .layers_to_transform
        .as_ref()
        .is_some_and(|v| !v.is_null())
    {
        return refuse("adapters of only some layers (layers_to_transform) are not supported");
    }
    if !file.rank_pattern.is_empty() || !file.alpha_pattern.is_empty() {
        return refuse(
            "per-module ranks or alphas (rank_pattern, alpha_pattern) are not supported",
        );
    }
    let targets = match &file.target_modules {
        TargetModules::One(s) => LoraTarget::parse_list(s),
        TargetModules::List(l) => LoraTarget::parse_list(&l.join(",")),
    }
    .map_err(|e| Error::format(&cfg_path, format!("target_modules: {e}")))?;
    let lora = LoraConfig {
        rank: file.r,
        alpha: file.lora_alpha,
        targets,
        dropout: file.lora_dropout,
    };
    let layout = LoraLayout::new(model, lora)?;
    let weights = SafetensorsFile::open(&dir.join(WEIGHTS_FILE))?;
    let mut params = vec![0.0f32; layout.total()];
    for t in &layout.tensors {
        // PEFT writes names without the adapter's name; some tools keep `.default`.
        let with_default = t.name.replace(".weight", ".default.weight");
        let name = if weights.info(&t.name).is_some() {
            t.name.clone()
        } else if weights.info(&with_default).is_some() {
            with_default
        } else {
            return Err(Error::format(
                dir.join(WEIGHTS_FILE),
                format!(
                    "missing adapter tensor {} (the config names {} of every layer)",
                    t.name,
                    layout
                        .cfg
                        .targets
                        .iter()
                        .map(|t| t.module())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        };
        let (shape, data) = weights.read_f32(&name)?;
        if shape != t.shape {
            return Err(Error::format(
                dir.join(WEIGHTS_FILE),
                format!(
                    "{name} has shape {shape:?}, but this model needs {:?} (an adapter of another model?)",
                    t.shape
                ),
            ));
        }
        params[t.range()].copy_from_slice(&data);
    }
    let expected = layout.tensors.len();
    let lora_names = weights
        .names()
        .into_iter()
        .filter(|n| n.starts_with("base_model.") && n.contains(".lora_"))
        .count();
    if lora_names > expected {
        return Err(Error::format(
            dir.join(WEIGHTS_FILE),
            format!(
                "holds {lora_names} LoRA tensors but this model has room for {expected} (an adapter of a deeper model?)"
            ),
        ));
    }
    if model.rope_style == RopeStyle::Interleaved {
        permute_qk_b(model, &layout, &mut params, RopeStyle::Interleaved);
    }
    Ok(LoadedAdapter {
        layout,
        params,
        base: file.base_model_name_or_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load_gives_back_the_adapters_in_both_rope_pairings() {
        for style in [RopeStyle::RotateHalf, RopeStyle::Interleaved] {
            let mut cfg = ModelConfig::preset("tiny").unwrap();
            cfg.rope_style = style;
            let lora = LoraConfig {
                rank: 2,
                alpha: 5.0,
                targets: vec![LoraTarget::Q, LoraTarget::K, LoraTarget::Down],
                dropout: 0.1,
            };
            let layout = LoraLayout::new(&cfg, lora.clone()).unwrap();
            let params: Vec<f32> = (0..layout.total()).map(|i| i as f32 * 0.001).collect();
            let dir = tempfile::tempdir().unwrap();
            save(dir.path(), &cfg, &layout, &params, Some("base")).unwrap();
            let back = load(dir.path(), &cfg).unwrap();
            assert_eq!(back.params, params);
            assert_eq!(back.layout.cfg, lora);
            assert_eq!(back.base.as_deref(), Some("base"));
            // A model of another width refuses it.
            let mut other = cfg.clone();
            other.ffn_dim += 2;
            let e = load(dir.path(), &other).unwrap_err().to_string();
            assert!(e.contains("shape"), "{e}");
        }
    }
}
