//! What a run trains and on what: the model (`--model`, `--init-from`) and the data (`--data`),
//! parsed once from the strings a [`TrainConfig`](super::TrainConfig) saves.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::model::ModelConfig;
use crate::model::config::PRESETS;

/// The model a run trains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// A built-in shape (`tiny`, `small`, `stories15m`, ..., `qwen3-0.6b`), lower case; a fresh
    /// run gives it the tokenizer's vocabulary.
    Preset(String),
    /// A Hugging Face `config.json` (or a folder holding one): a fresh initialisation of that
    /// shape, whose vocabulary must cover the tokenizer's.
    HfConfig(PathBuf),
    /// The weights of a model file or folder (`--init-from`: Hugging Face, llama2.c, GGUF, a
    /// handgrad checkpoint or run folder), whose config replaces `--model`.
    Pretrained(PathBuf),
}

impl ModelSpec {
    /// `--model`: a preset name (any case) or the path of a `config.json` or of a folder with
    /// one. An unknown name is refused with the presets listed.
    pub fn parse(model: &str) -> Result<ModelSpec> {
        let lower = model.to_ascii_lowercase();
        if PRESETS.contains(&lower.as_str()) {
            return Ok(ModelSpec::Preset(lower));
        }
        let path = Path::new(model);
        if path.exists() || model.ends_with(".json") {
            return Ok(ModelSpec::HfConfig(path.to_path_buf()));
        }
        // Neither a preset nor a file: the preset lookup says so, with the names.
        ModelConfig::preset(model).map(|_| ModelSpec::Preset(lower))
    }

    /// What a run's settings ask to train: the weights of `--init-from` when given, else
    /// `--model`.
    pub fn of(model: &str, init_from: Option<&str>) -> Result<ModelSpec> {
        match init_from {
            Some(p) => Ok(ModelSpec::Pretrained(PathBuf::from(p))),
            None => ModelSpec::parse(model),
        }
    }

    /// The model configuration of a preset or `config.json` (a pretrained model's comes with
    /// its weights: `None`).
    pub fn config(&self) -> Result<Option<ModelConfig>> {
        match self {
            ModelSpec::Preset(name) => ModelConfig::preset(name).map(Some),
            ModelSpec::HfConfig(path) if path.is_dir() => {
                ModelConfig::from_hf_file(&path.join("config.json")).map(Some)
            }
            ModelSpec::HfConfig(path) => ModelConfig::from_hf_file(path).map(Some),
            ModelSpec::Pretrained(_) => Ok(None),
        }
    }

    /// Whether the shape is a preset (which takes the tokenizer's vocabulary).
    pub fn is_preset(&self) -> bool {
        matches!(self, ModelSpec::Preset(_))
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSpec::Preset(name) => f.write_str(name),
            ModelSpec::HfConfig(p) | ModelSpec::Pretrained(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The token data a run trains on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// The built-in stories, generated and tokenized once into a cache; they bring their own
    /// tokenizer.
    Builtin,
    /// One token file (`.bin` of uint16/uint32 ids, or a handgrad shard); a fraction of it is
    /// held out for validation.
    Tokens(PathBuf),
    /// A folder of token shards (`handgrad prepare`'s output: train and val shards).
    Folder(PathBuf),
}

/// The `--data` value of the built-in stories.
pub const BUILTIN_DATA: &str = "builtin";

impl DataSource {
    /// `--data`: `builtin`, a folder, or a file.
    pub fn parse(data: &str) -> DataSource {
        if data == BUILTIN_DATA {
            return DataSource::Builtin;
        }
        let path = PathBuf::from(data);
        if path.is_dir() {
            DataSource::Folder(path)
        } else {
            DataSource::Tokens(path)
        }
    }

    /// The file or folder, except for the built-in data.
    pub fn path(&self) -> Option<&Path> {
        match self {
            DataSource::Builtin => None,
            DataSource::Tokens(p) | DataSource::Folder(p) => Some(p),
        }
    }

    /// Where a tokenizer saved next to the data would be.
    pub fn folder(&self) -> Option<PathBuf> {
        match self {
            DataSource::Builtin => None,
            DataSource::Folder(p) => Some(p.clone()),
            DataSource::Tokens(p) => Some(p.parent().map(Path::to_path_buf).unwrap_or_default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_specs_parse_by_kind() {
        assert_eq!(
            ModelSpec::parse("Stories15M").unwrap(),
            ModelSpec::Preset("stories15m".into())
        );
        assert_eq!(
            ModelSpec::parse("nowhere/config.json").unwrap(),
            ModelSpec::HfConfig("nowhere/config.json".into())
        );
        let dir = tempfile::tempdir().unwrap();
        let spec = ModelSpec::parse(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(spec, ModelSpec::HfConfig(dir.path().to_path_buf()));
        // A folder without config.json: refused when its config is read.
        assert!(spec.config().is_err());
        let e = ModelSpec::parse("smal").unwrap_err().to_string();
        assert!(e.contains("small"), "{e}");
        assert_eq!(
            ModelSpec::of("small", Some("m.gguf")).unwrap(),
            ModelSpec::Pretrained("m.gguf".into())
        );
        assert!(ModelSpec::of("small", None).unwrap().is_preset());
        assert!(
            ModelSpec::parse("tiny")
                .unwrap()
                .config()
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn data_sources_parse_by_kind() {
        assert_eq!(DataSource::parse("builtin"), DataSource::Builtin);
        let dir = tempfile::tempdir().unwrap();
        let d = DataSource::parse(dir.path().to_str().unwrap());
        assert_eq!(d, DataSource::Folder(dir.path().to_path_buf()));
        assert_eq!(d.folder().unwrap(), dir.path());
        let f = dir.path().join("tokens.bin");
        let t = DataSource::parse(f.to_str().unwrap());
        assert_eq!(t, DataSource::Tokens(f.clone()));
        assert_eq!(t.folder().unwrap(), dir.path());
        assert_eq!(t.path(), Some(f.as_path()));
        assert_eq!(DataSource::Builtin.path(), None);
    }
}
