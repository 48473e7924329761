//! Resuming a run: the configuration it continues with (the checkpoint's, or the saved
//! `train_config.json` of a run stopped before its first checkpoint), and the rules for a
//! setting given again on the command line: applied with a warning, or refused with the reason.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::run_folder::load_latest;
use crate::error::{Error, Result};
use crate::formats::checkpoint::Checkpoint;
use crate::run::{RunDir, TrainConfig};

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

/// Names every field of [`TrainConfig`]: a new field fails to compile here until
/// [`apply_given`] has a rule for it (applied or refused on resume).
fn every_field_has_a_rule(asked: &TrainConfig) {
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
        chat_template: _,
        lora_rank: _,
        lora_alpha: _,
        lora_targets: _,
        base_weights: _,
        lora_dropout: _,
        ranks: _,
        distributed_mode: _,
        sync_every: _,
        outer_lr: _,
        outer_momentum: _,
        grad_comm: _,
    } = asked;
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
    run: &RunDir,
    restart: bool,
) -> Result<Vec<String>> {
    every_field_has_a_rule(asked);
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
                    run.latest().display()
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
    rule!(chat_template, refuse "the run's examples were rendered with its template");
    rule!(lora_rank, refuse "the adapters' shapes are fixed for the run");
    rule!(lora_alpha, refuse "the adapters were trained at their scale");
    rule!(lora_targets, refuse "the adapters' shapes are fixed for the run");
    rule!(lora_dropout, apply);
    rule!(base_weights, refuse "the frozen model's rounding is part of the run's numbers");
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
    rule!(distributed_mode, refuse "the ranks' optimizer states belong to its mode");
    rule!(sync_every, apply);
    rule!(outer_lr, apply);
    rule!(outer_momentum, apply);
    rule!(grad_comm, apply);
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
    paths: &RunDir,
    asked: &TrainConfig,
    given: &GivenFlags,
    warnings: &mut Vec<String>,
) -> Result<(TrainConfig, ResumePoint)> {
    let (ck, path) = load_latest(paths, warnings)?;
    let mut cfg = ck.meta.train_config.clone();
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
    let applied = apply_given(&mut cfg, asked, given, paths, false)?;
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
    paths: &RunDir,
    asked: &TrainConfig,
    given: &GivenFlags,
    warnings: &mut Vec<String>,
) -> Result<Option<TrainConfig>> {
    let path = paths.train_config();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("reading", &path, e)),
    };
    let mut cfg: TrainConfig = serde_json::from_str(&text)
        .map_err(|e| Error::json(format!("reading {}", path.display()), e))?;
    let changed = apply_given(&mut cfg, asked, given, paths, true)?;
    if !changed.is_empty() {
        warnings.push(format!(
            "the run had no checkpoint yet: it starts again with this command's {}",
            changed.join(", ")
        ));
    }
    Ok(Some(cfg))
}

/// The error of `--resume` in a folder that holds nothing to resume.
pub fn nothing_to_resume(paths: &RunDir) -> Error {
    Error::checkpoint(
        paths.latest(),
        format!("no checkpoint to resume from in {}", paths.dir.display()),
    )
}

/// `--config FILE`: the settings saved in a `train_config.json` (or a run folder's), with
/// every setting the command gave applied (as for a run restarted before its first
/// checkpoint: a new run, so any change is sound).
pub fn with_given(path: &Path, asked: &TrainConfig, given: &GivenFlags) -> Result<TrainConfig> {
    let file = if path.is_dir() {
        RunDir::new(path).train_config()
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound && path.is_dir() {
            Error::invalid(format!(
                "--config {}: the folder has no train_config.json (give a run folder or its train_config.json)",
                path.display()
            ))
        } else {
            Error::io("reading the --config file", &file, e)
        }
    })?;
    let json = |e| Error::json(format!("reading {} (--config)", file.display()), e);
    let value: serde_json::Value = serde_json::from_str(&text).map_err(json)?;
    let unknown = unknown_settings(&value);
    if !unknown.is_empty() {
        return Err(Error::invalid(format!(
            "--config {}: not a run's training settings (unknown: {}); they are in the run folder's train_config.json",
            file.display(),
            unknown.join(", ")
        )));
    }
    let mut cfg: TrainConfig = serde_json::from_value(value).map_err(json)?;
    apply_given(&mut cfg, asked, given, &RunDir::new(path), true)?;
    Ok(cfg)
}

/// The keys of a JSON object that are no setting of [`TrainConfig`] (all of them for a file
/// that is not an object), at most five: another file given as `--config` (e.g. the model's
/// `config.json`) is refused instead of read as defaults.
fn unknown_settings(value: &serde_json::Value) -> Vec<String> {
    let Some(obj) = value.as_object() else {
        return vec!["(not a JSON object)".into()];
    };
    let known = serde_json::to_value(TrainConfig::default()).unwrap_or_default();
    obj.keys()
        .filter(|k| known.get(k.as_str()).is_none())
        .take(5)
        .cloned()
        .collect()
}
