//! File formats: Hugging Face folders (safetensors), llama2.c `.bin` files, GGUF, and
//! handgrad's own checkpoints; one entry point to load a model from any of them.

pub mod checkpoint;
pub mod gguf;
pub mod hf;
pub mod llama2c;
pub mod peft;
pub mod safetensors;

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::tokenizer::{self, Tokenizer};

/// A tokenizer file carried along with a model.
#[derive(Debug, Clone)]
pub struct TokenizerFile {
    /// `tokenizer.json` or `tokenizer.bin`.
    pub name: String,
    pub bytes: Vec<u8>,
}

impl TokenizerFile {
    /// The tokenizer file of a folder, if it has one.
    pub fn find(dir: &Path) -> Result<Option<Self>> {
        match tokenizer::find_in_dir(dir) {
            Some(p) => Ok(Some(TokenizerFile {
                name: p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("tokenizer.json")
                    .to_string(),
                bytes: std::fs::read(&p).map_err(|e| Error::io("reading", &p, e))?,
            })),
            None => Ok(None),
        }
    }

    /// From a loaded tokenizer.
    pub fn of(t: &dyn Tokenizer) -> Self {
        TokenizerFile {
            name: t.file_name().to_string(),
            bytes: t.file_bytes().to_vec(),
        }
    }

    /// Parses it.
    pub fn load(&self, origin: &Path) -> Result<Box<dyn Tokenizer>> {
        tokenizer::from_bytes(self.bytes.clone(), &origin.join(&self.name))
    }
}

/// A model read from a file: its configuration, parameters in handgrad's layout, and the
/// tokenizer that came with it (if any).
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub cfg: ModelConfig,
    pub params: Vec<f32>,
    pub tokenizer: Option<TokenizerFile>,
    /// A description of the source format, for messages.
    pub format: String,
    /// Things the loader skipped.
    pub warnings: Vec<String>,
    /// Token ids kept by vocabulary compaction (handgrad checkpoints trained with it).
    pub vocab_kept: Option<Vec<u32>>,
}

impl LoadedModel {
    /// The model to run these weights with (restricted to the kept vocabulary of a
    /// compacted checkpoint).
    pub fn transformer(&self) -> crate::model::Transformer {
        let mut model = crate::model::Transformer::new(self.cfg.clone());
        if let Some(kept) = &self.vocab_kept {
            model.set_compaction(Some(crate::model::VocabCompaction::from_kept(
                kept.clone(),
                model.cfg.vocab_size,
            )));
        }
        model
    }
}

/// The model formats handgrad reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    HuggingFace,
    Llama2c,
    Gguf,
    Checkpoint,
    /// A handgrad run folder: its latest checkpoint.
    RunFolder,
}

/// Recognises a model file or folder by its content.
pub fn detect(path: &Path) -> Result<ModelFormat> {
    if path.is_dir() {
        // A run folder also holds a config.json: tell it apart by its training settings.
        if crate::run::RunDir::is_run_folder(path) {
            return Ok(ModelFormat::RunFolder);
        }
        if path.join("config.json").exists() {
            return Ok(ModelFormat::HuggingFace);
        }
        return Err(Error::format(
            path,
            "a folder without config.json is not a Hugging Face model folder",
        ));
    }
    let mut head = [0u8; 8];
    let n = {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
        f.read(&mut head)
            .map_err(|e| Error::io("reading", path, e))?
    };
    let head = &head[..n];
    if head.starts_with(b"GGUF") {
        Ok(ModelFormat::Gguf)
    } else if head.starts_with(b"HGCKPT") {
        Ok(ModelFormat::Checkpoint)
    } else if path.extension().is_some_and(|x| x == "safetensors") {
        Ok(ModelFormat::HuggingFace)
    } else if n >= 8 && (llama2c::has_magic(head) || path.extension().is_some_and(|x| x == "bin")) {
        Ok(ModelFormat::Llama2c)
    } else {
        Err(Error::format(
            path,
            "unrecognised model file (expected a Hugging Face folder, .safetensors, llama2.c .bin, GGUF or handgrad checkpoint)",
        ))
    }
}

/// Loads a model from any supported format.
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    match detect(path)? {
        ModelFormat::HuggingFace => hf::load(path),
        ModelFormat::Llama2c => llama2c::load(path),
        ModelFormat::Gguf => gguf::load(path),
        ModelFormat::RunFolder => {
            let latest = crate::run::RunDir::new(path).latest();
            if !latest.exists() {
                return Err(Error::format(
                    path,
                    "a handgrad run folder without a checkpoint yet (it saves one every --save-every updates and when it ends)",
                ));
            }
            let mut m = load_model(&latest)?;
            m.format = format!("handgrad run folder, {}", m.format);
            Ok(m)
        }
        ModelFormat::Checkpoint => {
            let ck = checkpoint::Checkpoint::load(path)?;
            if ck.meta.train_config.lora_rank.is_some() {
                return load_lora_checkpoint(path, ck);
            }
            let cfg = ck.meta.model_config.clone();
            if ck.params.len() != crate::model::ParamLayout::new(&cfg).total() {
                return Err(Error::checkpoint(
                    path,
                    "parameter count does not match its model config",
                ));
            }
            let tokenizer = if ck.tokenizer.is_empty() {
                None
            } else {
                Some(TokenizerFile {
                    name: ck
                        .meta
                        .tokenizer_file
                        .clone()
                        .unwrap_or_else(|| "tokenizer.json".into()),
                    bytes: ck.tokenizer,
                })
            };
            Ok(LoadedModel {
                cfg,
                params: ck.params,
                tokenizer,
                format: format!("handgrad checkpoint (step {})", ck.meta.step),
                warnings: Vec::new(),
                vocab_kept: ck.meta.vocab_kept,
            })
        }
    }
}

/// [`load_model`], with a PEFT LoRA adapter folder merged in when one is given
/// (`--adapter DIR`: `W + (alpha/r) B A` for every adapted matrix).
pub fn load_model_with_adapter(path: &Path, adapter: Option<&Path>) -> Result<LoadedModel> {
    let mut m = load_model(path)?;
    if let Some(dir) = adapter {
        let a = peft::load(dir, &m.cfg)?;
        m.params = a.merge_into(&m.cfg, &m.params);
        m.format = format!(
            "{} + LoRA adapter {} (rank {}, merged)",
            m.format,
            dir.display(),
            a.layout.cfg.rank
        );
    }
    Ok(m)
}

/// A LoRA run's checkpoint holds its adapters: the model is its frozen `--init-from` model
/// with them merged in.
fn load_lora_checkpoint(path: &Path, ck: checkpoint::Checkpoint) -> Result<LoadedModel> {
    let train = &ck.meta.train_config;
    let Some(base_path) = train.init_from.as_deref() else {
        return Err(Error::checkpoint(
            path,
            "LoRA adapters without the model they adapt",
        ));
    };
    let base = load_model(Path::new(base_path)).map_err(|e| {
        Error::checkpoint(
            path,
            format!(
                "holds LoRA adapters of {base_path}, which cannot be read from here ({e}); run from the folder the training ran in, or load the PEFT adapter in the run's adapter/ folder over the base model with --adapter"
            ),
        )
    })?;
    let cfg = ck.meta.model_config.clone();
    let lora = train
        .lora()?
        .ok_or_else(|| Error::checkpoint(path, "LoRA settings missing"))?;
    let layout = crate::model::LoraLayout::new(&cfg, lora)?;
    if ck.params.len() != layout.total() || base.params.len() != layout_total(&cfg) {
        return Err(Error::checkpoint(
            path,
            "its adapters do not fit the model they adapt",
        ));
    }
    let params = layout.merge(
        &crate::model::ParamLayout::new(&cfg),
        &base.params,
        &ck.params,
    );
    let tokenizer = if ck.tokenizer.is_empty() {
        base.tokenizer
    } else {
        Some(TokenizerFile {
            name: ck
                .meta
                .tokenizer_file
                .clone()
                .unwrap_or_else(|| "tokenizer.json".into()),
            bytes: ck.tokenizer,
        })
    };
    Ok(LoadedModel {
        cfg,
        params,
        tokenizer,
        format: format!(
            "handgrad checkpoint (step {}, LoRA rank {} merged into {base_path})",
            ck.meta.step, layout.cfg.rank
        ),
        warnings: base.warnings,
        vocab_kept: ck.meta.vocab_kept,
    })
}

fn layout_total(cfg: &ModelConfig) -> usize {
    crate::model::ParamLayout::new(cfg).total()
}

/// Refuses a model whose header describes more parameters than a file of `file_bytes` can
/// hold (every supported element type takes at least a byte), before the layout of a model
/// of that size is even built: a damaged header must not cost gigabytes or minutes.
pub fn check_fits(cfg: &ModelConfig, file_bytes: usize, path: &Path) -> Result<()> {
    let per_layer = cfg
        .dim
        .saturating_mul(2)
        .saturating_add(cfg.dim.saturating_mul(cfg.ffn_dim).saturating_mul(3))
        .saturating_add(
            cfg.dim
                .saturating_mul(cfg.n_heads.saturating_mul(cfg.head_dim))
                .saturating_mul(2),
        );
    let lower_bound = cfg
        .n_layers
        .saturating_mul(per_layer)
        .saturating_add(cfg.vocab_size.saturating_mul(cfg.dim));
    if lower_bound > file_bytes {
        return Err(Error::format(
            path,
            format!(
                "the header describes a model of at least {lower_bound} parameters ({} layers of dim {}), more than this {file_bytes}-byte file can hold",
                cfg.n_layers, cfg.dim
            ),
        ));
    }
    Ok(())
}
