//! Resolving a run before anything is written: the configuration (fresh or resumed), the
//! weights to start from, the data and its tokenizer, the model configuration and the
//! vocabulary compaction. Each step is a function of what the previous ones found, so each can
//! fail with a clear error while the run folder is still untouched.

use std::path::{Path, PathBuf};

use super::config::TrainConfig;
use super::run_dir::{RunPaths, load_latest};
use crate::backend::Backend;
use crate::data::{Dataset, builtin};
use crate::error::{Error, Result};
use crate::formats::LoadedModel;
use crate::formats::checkpoint::Checkpoint;
use crate::model::config::PRESETS;
use crate::model::{ModelConfig, Transformer, VocabCompaction};
use crate::tokenizer::{self, Tokenizer};

/// The checkpoint a resumed run continues from.
pub struct ResumePoint {
    pub checkpoint: Checkpoint,
    pub path: PathBuf,
}

/// What a resumed run may change about its saved configuration.
#[derive(Debug, Clone, Default)]
pub struct ResumeChanges {
    /// A new total number of updates.
    pub steps: Option<usize>,
    /// Another backend or precision.
    pub backend: Option<Backend>,
}

/// The configuration of a resumed run: the checkpoint's, with the allowed changes applied
/// (each reported as a warning).
pub fn resume_config(
    paths: &RunPaths,
    changes: &ResumeChanges,
    warnings: &mut Vec<String>,
) -> Result<(TrainConfig, ResumePoint)> {
    let (ck, path) = load_latest(paths, warnings)?;
    let mut cfg: TrainConfig = serde_json::from_value(ck.meta.train_config.clone())
        .map_err(|e| Error::checkpoint(&path, format!("unreadable training config: {e}")))?;
    if let Some(s) = changes.steps {
        if (s as u64) < ck.meta.step {
            return Err(Error::invalid(format!(
                "--steps {s} is below the {} updates the checkpoint already has",
                ck.meta.step
            )));
        }
        if s != cfg.steps {
            warnings.push(format!(
                "--steps changed from {} to {s}: the learning-rate schedule is re-planned from here",
                cfg.steps
            ));
        }
        cfg.steps = s;
    }
    if let Some(b) = changes.backend
        && b != cfg.backend()
    {
        warnings.push(format!(
            "the backend changed from {} to {b}: results are no longer bit-identical to an uninterrupted run",
            cfg.backend()
        ));
        cfg.backend = b.kind;
        cfg.precision = b.precision;
    }
    Ok((
        cfg,
        ResumePoint {
            checkpoint: ck,
            path,
        },
    ))
}

/// The saved settings of a run that has no checkpoint yet (it was stopped before its first),
/// to start it again: `train_config.json`, with `--steps` applied. `None` when the run never
/// wrote them (stopped during start-up).
pub fn restart_config(paths: &RunPaths, changes: &ResumeChanges) -> Result<Option<TrainConfig>> {
    let path = paths.dir.join("train_config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("reading", &path, e)),
    };
    let mut cfg: TrainConfig = serde_json::from_str(&text)
        .map_err(|e| Error::json(format!("reading {}", path.display()), e))?;
    if let Some(s) = changes.steps {
        cfg.steps = s;
    }
    if let Some(b) = changes.backend {
        cfg.backend = b.kind;
        cfg.precision = b.precision;
    }
    Ok(Some(cfg))
}

/// The error of `--resume` in a folder that holds nothing to resume.
pub fn nothing_to_resume(paths: &RunPaths) -> Error {
    Error::checkpoint(
        paths.latest(),
        format!("no checkpoint to resume from in {}", paths.dir.display()),
    )
}

/// The pretrained weights of `--init-from` (fresh runs only).
pub fn load_init(cfg: &TrainConfig, resume: Option<&ResumePoint>) -> Result<Option<LoadedModel>> {
    match (resume, &cfg.init_from) {
        (None, Some(p)) => Ok(Some(crate::formats::load_model(Path::new(p))?)),
        _ => Ok(None),
    }
}

/// The tokenizer that came with the weights: the checkpoint's on resume, the pretrained
/// model's with `--init-from`.
pub fn weights_tokenizer(
    cfg: &TrainConfig,
    resume: Option<&ResumePoint>,
    init: Option<&LoadedModel>,
) -> Result<Option<Box<dyn Tokenizer>>> {
    match (resume, init) {
        (Some(r), _) if !r.checkpoint.tokenizer.is_empty() => Ok(Some(tokenizer::from_bytes(
            r.checkpoint.tokenizer.clone(),
            &r.path,
        )?)),
        (_, Some(m)) => match &m.tokenizer {
            Some(t) => Ok(Some(
                t.load(Path::new(cfg.init_from.as_deref().unwrap_or("")))?,
            )),
            None => Ok(None),
        },
        _ => Ok(None),
    }
}

/// Resolved data and tokenizer.
pub struct DataSetup {
    pub data: Dataset,
    pub tokenizer: Option<Box<dyn Tokenizer>>,
    pub source: String,
}

/// Resolves the data and its tokenizer. `model_tok` is the tokenizer that came with the
/// weights, which takes precedence over one found next to the data; `--tokenizer` takes
/// precedence over both. `log` receives progress messages (building the built-in data).
pub fn data(
    cfg: &TrainConfig,
    cache_root: &Path,
    model_tok: Option<Box<dyn Tokenizer>>,
    log: &mut dyn FnMut(&str),
) -> Result<DataSetup> {
    if cfg.data == "builtin" {
        if cfg.tokenizer.is_some() {
            return Err(Error::invalid(
                "the built-in data comes with its own tokenizer; drop --tokenizer or give --data",
            ));
        }
        if cfg.init_from.is_some() {
            return Err(Error::invalid(
                "the built-in data has its own tokenizer, which a pretrained model does not share; \
                 tokenize your text with the model's tokenizer (handgrad prepare) and pass --data",
            ));
        }
        let b = builtin::ensure(cache_root, log)?;
        let data = Dataset::from_files(
            std::slice::from_ref(&b.train),
            std::slice::from_ref(&b.val),
            0.0,
        )?;
        let tok = tokenizer::load(&b.tokenizer)?;
        return Ok(DataSetup {
            data,
            tokenizer: Some(tok),
            source: format!("built-in stories ({})", b.dir.display()),
        });
    }
    let path = PathBuf::from(&cfg.data);
    let data = Dataset::open(&path, cfg.val_fraction)?;
    let tok_path = match &cfg.tokenizer {
        Some(t) => Some(PathBuf::from(t)),
        None => {
            let dir = if path.is_dir() {
                path.clone()
            } else {
                path.parent().map(Path::to_path_buf).unwrap_or_default()
            };
            tokenizer::find_in_dir(&dir)
        }
    };
    let tokenizer = match (tok_path, model_tok) {
        (Some(p), _) if cfg.tokenizer.is_some() => Some(tokenizer::load(&p)?),
        (_, Some(t)) => Some(t),
        (Some(p), None) => Some(tokenizer::load(&p)?),
        (None, None) => None,
    };
    if let (Some(t), Some(id)) = (&tokenizer, &data.tokenizer_id)
        && t.id() != id
    {
        return Err(Error::invalid(format!(
            "the data was tokenized with tokenizer {id}, but the tokenizer in use is {} ({})",
            t.id(),
            cfg.tokenizer
                .as_deref()
                .unwrap_or("from the model or next to the data")
        )));
    }
    Ok(DataSetup {
        data,
        tokenizer,
        source: cfg.data.clone(),
    })
}

/// The model config for a fresh run from a preset or `config.json`: presets take the
/// tokenizer's vocabulary, explicit configs must cover it.
pub fn model_from_spec(spec: &str, tok: Option<&dyn Tokenizer>) -> Result<ModelConfig> {
    let mut mc = ModelConfig::from_preset_or_path(spec)?;
    let is_preset = PRESETS.contains(&spec.to_ascii_lowercase().as_str());
    if let Some(t) = tok {
        if is_preset {
            mc.vocab_size = t.vocab_size();
            mc.bos_token_id = t.bos_id();
            mc.eos_token_id = t.eos_id();
        } else if t.vocab_size() > mc.vocab_size {
            return Err(Error::config(
                spec,
                format!(
                    "field `vocab_size` ({}) is smaller than the tokenizer's vocabulary ({})",
                    mc.vocab_size,
                    t.vocab_size()
                ),
            ));
        }
    }
    mc.validate(spec)?;
    Ok(mc)
}

/// Names the fields in which two model configs differ.
pub fn config_differences(a: &ModelConfig, b: &ModelConfig) -> Vec<String> {
    let (ja, jb) = (a.to_hf_json(), b.to_hf_json());
    let mut diffs = Vec::new();
    if let (Some(oa), Some(ob)) = (ja.as_object(), jb.as_object()) {
        for (k, va) in oa {
            if k == "bos_token_id" || k == "eos_token_id" {
                continue;
            }
            let vb = ob.get(k).cloned().unwrap_or(serde_json::Value::Null);
            if *va != vb {
                diffs.push(format!("{k} {vb} in the checkpoint vs {va} requested"));
            }
        }
    }
    diffs
}

/// The model config of a resumed run: the checkpoint's, which must match `--model` when given
/// and must have been trained with the tokenizer in use.
pub fn model_of_checkpoint(
    r: &ResumePoint,
    requested: Option<&str>,
    tok: Option<&dyn Tokenizer>,
) -> Result<ModelConfig> {
    let meta = &r.checkpoint.meta;
    let mc = ModelConfig::from_hf_json(&meta.model_config, &r.path.display().to_string())?;
    if let Some(spec) = requested {
        let want = model_from_spec(spec, tok)?;
        let diffs = config_differences(&want, &mc);
        if !diffs.is_empty() {
            return Err(Error::checkpoint(
                &r.path,
                format!(
                    "holds a different model than --model {spec}: {}",
                    diffs.join(", ")
                ),
            ));
        }
    }
    let tok_id = tok
        .map(|t| t.id().to_string())
        .unwrap_or_else(|| "none".into());
    if tok_id != meta.tokenizer_id {
        return Err(Error::checkpoint(
            &r.path,
            format!(
                "was trained with tokenizer {}, but this data uses {tok_id}",
                meta.tokenizer_id
            ),
        ));
    }
    Ok(mc)
}

/// The model config of a fine-tuning run: the pretrained model's, whose vocabulary must cover
/// the tokenizer's.
pub fn model_of_init(
    init: &LoadedModel,
    origin: &str,
    tok: Option<&dyn Tokenizer>,
    warnings: &mut Vec<String>,
) -> Result<ModelConfig> {
    if let Some(t) = tok
        && t.vocab_size() > init.cfg.vocab_size
    {
        return Err(Error::invalid(format!(
            "the tokenizer has {} ids but the model in {origin} only {}",
            t.vocab_size(),
            init.cfg.vocab_size
        )));
    }
    warnings.extend(init.warnings.iter().cloned());
    Ok(init.cfg.clone())
}

/// The sequence length of a run: `cfg.seq`, or the model's limit when that is smaller and
/// `cap` allows it (the length was a default, not the user's choice; a note says so).
pub fn sequence_length(
    cfg: &TrainConfig,
    model: &ModelConfig,
    cap: bool,
    notes: &mut Vec<String>,
) -> Result<usize> {
    if cfg.seq <= model.max_seq_len {
        return Ok(cfg.seq);
    }
    if cap {
        notes.push(format!(
            "sequences of {} tokens, the model's limit (the default --seq is {})",
            model.max_seq_len, cfg.seq
        ));
        return Ok(model.max_seq_len);
    }
    Err(Error::invalid(format!(
        "--seq {} exceeds the model's {} positions",
        cfg.seq, model.max_seq_len
    )))
}

/// The vocabulary compaction of a run (when on): the checkpoint's kept ids on resume, else the
/// ids present in the data.
pub fn compaction(
    cfg: &TrainConfig,
    model: &Transformer,
    data: &Dataset,
    resume: Option<&ResumePoint>,
) -> Option<VocabCompaction> {
    if !cfg.vocab_compaction {
        return None;
    }
    let vocab = model.cfg.vocab_size;
    match resume.and_then(|r| r.checkpoint.meta.vocab_kept.clone()) {
        Some(kept) => Some(VocabCompaction::from_kept(kept, vocab)),
        None => {
            let mut present = vec![false; vocab];
            data.mark_present(&mut present);
            Some(VocabCompaction::from_presence(&present))
        }
    }
}
