//! Resolving a run before anything is written: the configuration (fresh or resumed), the
//! weights to start from, the data and its tokenizer, the model configuration and the
//! vocabulary compaction. Each step is a function of what the previous ones found, so each can
//! fail with a clear error while the run folder is still untouched.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::config::TrainConfig;
use super::run_dir::{RunPaths, load_latest};
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

/// The settings given on the command line, by their [`TrainConfig`] field names (`lr`,
/// `min_lr_ratio`, `backend`, ...), so that a resumed run can tell a setting the user asked to
/// change from a default. Empty for programmatic callers: nothing is changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GivenFlags(pub BTreeSet<String>);

impl GivenFlags {
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        GivenFlags(names.into_iter().map(Into::into).collect())
    }

    pub fn contains(&self, field: &str) -> bool {
        self.0.contains(field)
    }
}

/// The flag of a configuration field (`min_lr_ratio` -> `--min-lr-ratio`).
fn flag(field: &str) -> String {
    format!("--{}", field.replace('_', "-"))
}

/// A value as the user would write it.
fn shown<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(serde_json::Value::Null) => "none".into(),
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

/// Applies to `saved` (the configuration of a run being resumed) every setting the command
/// gave (`given`, with the values of `asked`) that differs from it: the ones a resumed run can
/// take soundly are applied with a warning naming each; the others are refused in one line
/// saying why. `--steps` and `--model` are checked by their own rules.
/// With `restart` (the run has no checkpoint yet, so nothing has been trained) every given
/// setting is applied, none refused; the changes are returned.
fn apply_given(
    saved: &mut TrainConfig,
    asked: &TrainConfig,
    given: &GivenFlags,
    run: &Path,
    restart: bool,
) -> Result<Vec<String>> {
    // Every field must be named below (a new one fails to compile here until it has a rule).
    let TrainConfig {
        model: _,
        init_from: _,
        data: _,
        tokenizer: _,
        steps: _,
        batch: _,
        seq: _,
        accum: _,
        lr: _,
        min_lr_ratio: _,
        warmup: _,
        weight_decay: _,
        beta1: _,
        beta2: _,
        adam_eps: _,
        clip: _,
        seed: _,
        eval_every: _,
        eval_batches: _,
        save_every: _,
        vocab_compaction: _,
        backend: _,
        precision: _,
        loss_scale: _,
        max_bad_updates: _,
        val_fraction: _,
        sample_prompt: _,
        sample_tokens: _,
        ranks: _,
    } = asked;
    let mut refused: Option<Error> = None;
    let mut applied = Vec::new();
    macro_rules! rule {
        ($field:ident, apply) => {
            if given.contains(stringify!($field)) && saved.$field != asked.$field {
                applied.push(format!(
                    "{} {} -> {}",
                    flag(stringify!($field)),
                    shown(&saved.$field),
                    shown(&asked.$field)
                ));
                saved.$field = asked.$field.clone();
            }
        };
        ($field:ident, refuse $why:expr) => {
            if restart {
                rule!($field, apply);
            } else if refused.is_none()
                && given.contains(stringify!($field))
                && saved.$field != asked.$field
            {
                refused = Some(Error::invalid(format!(
                    "{} {} differs from the run's {}: {}; to change it, start a new run from this one's weights with --init-from {}",
                    flag(stringify!($field)),
                    shown(&asked.$field),
                    shown(&saved.$field),
                    $why,
                    run.join("checkpoints").join("latest").display()
                )));
            }
        };
    }
    // What the weights and the data position belong to.
    rule!(init_from, refuse "a resumed run continues from its checkpoint's weights");
    rule!(data, refuse "the run's data position belongs to its data");
    rule!(tokenizer, refuse "the run's vocabulary belongs to its tokenizer");
    rule!(seq, refuse "the run's data windows and positions are of its sequence length");
    rule!(seed, refuse "the data order continues from the saved sampler, which the seed only starts");
    rule!(vocab_compaction, refuse "the classifier's rows are fixed for the run");
    rule!(val_fraction, refuse "the validation split is fixed for the run");
    // What the optimizer and the loop can take from any update on.
    rule!(batch, apply);
    rule!(accum, apply);
    rule!(lr, apply);
    rule!(min_lr_ratio, apply);
    rule!(warmup, apply);
    rule!(weight_decay, apply);
    rule!(beta1, apply);
    rule!(beta2, apply);
    rule!(clip, apply);
    rule!(eval_every, apply);
    rule!(eval_batches, apply);
    rule!(save_every, apply);
    rule!(loss_scale, apply);
    rule!(max_bad_updates, apply);
    rule!(sample_prompt, apply);
    rule!(sample_tokens, apply);
    rule!(backend, apply);
    rule!(precision, apply);
    // Not flags: adam_eps, ranks (the rank count is the job's). model and steps: their own
    // rules (a restart takes them as given).
    if restart {
        rule!(model, apply);
        rule!(steps, apply);
    }
    match refused {
        Some(e) => Err(e),
        None => Ok(applied),
    }
}

/// The configuration of a resumed run: the checkpoint's, with the settings the command gave
/// applied (each reported) or refused (see [`apply_given`]). A run that has done all
/// its updates is refused with how to extend it.
pub fn resume_config(
    paths: &RunPaths,
    asked: &TrainConfig,
    given: &GivenFlags,
    warnings: &mut Vec<String>,
) -> Result<(TrainConfig, ResumePoint)> {
    let (ck, path) = load_latest(paths, warnings)?;
    let mut cfg: TrainConfig = serde_json::from_value(ck.meta.train_config.clone())
        .map_err(|e| Error::checkpoint(&path, format!("unreadable training config: {e}")))?;
    let done = ck.meta.step;
    if given.contains("steps") {
        let s = asked.steps;
        if (s as u64) < done {
            return Err(Error::invalid(format!(
                "--steps {s} is below the {done} updates the checkpoint already has"
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
    let applied = apply_given(&mut cfg, asked, given, &paths.dir, false)?;
    if !applied.is_empty() {
        warnings.push(format!(
            "resumed with new settings: {}; the rest of the run differs from an uninterrupted one",
            applied.join(", ")
        ));
    }
    if done >= cfg.steps as u64 {
        return Err(Error::invalid(format!(
            "the run in {} has finished: it did all its {} updates; to train it further, resume with more, e.g. --resume --steps {}",
            paths.dir.display(),
            cfg.steps,
            2 * cfg.steps
        )));
    }
    Ok((
        cfg,
        ResumePoint {
            checkpoint: ck,
            path,
        },
    ))
}

/// The settings of a run that has no checkpoint yet (it was stopped before its first), to
/// start it again: its saved `train_config.json`, with every setting this command gave
/// applied (nothing has been trained, so any change is sound). `None` when the run never
/// wrote them (stopped during start-up).
pub fn restart_config(
    paths: &RunPaths,
    asked: &TrainConfig,
    given: &GivenFlags,
    warnings: &mut Vec<String>,
) -> Result<Option<TrainConfig>> {
    let path = paths.dir.join("train_config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("reading", &path, e)),
    };
    let mut cfg: TrainConfig = serde_json::from_str(&text)
        .map_err(|e| Error::json(format!("reading {}", path.display()), e))?;
    let changed = apply_given(&mut cfg, asked, given, &paths.dir, true)?;
    if !changed.is_empty() {
        warnings.push(format!(
            "the run had no checkpoint yet: it starts again with this command's {}",
            changed.join(", ")
        ));
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
