//! Resolving a run before anything is written: the configuration (fresh or resumed, see
//! `resume`), the weights to start from, the data and its tokenizer, the model configuration
//! and the vocabulary compaction, into one [`ResolvedRun`]. Each step is a function of what
//! the previous ones found, so each can fail with a clear error while the run folder is still
//! untouched.

use std::path::{Path, PathBuf};

use super::batches::{TrainData, chat_template, is_chat_data};
use super::distributed::{Collective, rescale_accum};
use super::resume::{self, GivenFlags, ResumePoint};
use crate::data::chat::{ChatData, ChatEncoder};
use crate::data::{Dataset, builtin};
use crate::error::{Error, Result};
use crate::formats::LoadedModel;
use crate::model::{ModelConfig, Transformer, VocabCompaction};
use crate::run::{DataSource, ModelSpec, RunDir, TrainConfig};
use crate::tokenizer::{self, Tokenizer};

/// A run with everything decided, before the kernels are prepared and the folder written.
pub struct ResolvedRun {
    /// The settings it trains with (a resumed run's, with the changes the command made).
    pub cfg: TrainConfig,
    /// The model, with its vocabulary compaction.
    pub model: Transformer,
    pub data: DataSetup,
    /// The checkpoint it continues from.
    pub resume: Option<ResumePoint>,
    /// The pretrained weights it starts from (`--init-from`, fresh runs).
    pub init: Option<LoadedModel>,
    /// Whether the run folder is continued (`--resume` of a run that saved something) rather
    /// than made.
    pub continues_folder: bool,
}

/// What the command asked, besides the settings, that resolving a run reads.
pub struct ResolveRequest<'a> {
    pub folder: &'a RunDir,
    /// `--resume`.
    pub resume: bool,
    /// The settings the command line gave (see [`GivenFlags`]).
    pub given: &'a GivenFlags,
    /// On resume: the model the user named, to refuse a checkpoint of another model.
    pub requested_model: Option<&'a str>,
    /// Where the built-in dataset is cached.
    pub cache_root: &'a Path,
    /// `--seq` was a default: a model with fewer positions trains on its limit.
    pub cap_seq_to_model: bool,
    /// The folder holds only the lock of a trainer killed while starting.
    pub killed_while_starting: bool,
}

/// Resolves a run: the configuration (fresh, restarted or resumed), the ranks' share of the
/// batch, the weights to start from, the data and its tokenizer, and the model. `log`
/// receives progress (building the built-in data); warnings and notes for the run header
/// are added to those given.
pub fn resolve(
    cfg: TrainConfig,
    req: &ResolveRequest,
    ranks: &dyn Collective,
    log: &mut dyn FnMut(&str),
    warnings: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Result<ResolvedRun> {
    let (mut cfg, resume) = settings(cfg, req, warnings)?;
    cfg.validate()?;
    share_among_ranks(&mut cfg, resume.is_some(), ranks, warnings, notes)?;
    warnings.extend(cfg.backend().warnings());
    // Fail fast on a bad model name or config before any data work.
    let spec = ModelSpec::of(&cfg.model, cfg.init_from.as_deref())?;
    spec.config()?;
    let requested = req.requested_model.map(ModelSpec::parse).transpose()?;
    if let Some(r) = &requested {
        r.config()?;
    }

    // The weights to start from, the data and the tokenizer.
    let init = load_init(&cfg, resume.as_ref())?;
    let model_tok = weights_tokenizer(&cfg, resume.as_ref(), init.as_ref())?;
    let mut data = data(&cfg, req.cache_root, model_tok, log)?;
    let tok = data.tokenizer.as_deref();

    // The model.
    let model_cfg = match (&resume, &init) {
        (Some(r), _) => model_of_checkpoint(r, requested.as_ref(), tok)?,
        (None, Some(m)) => {
            let origin = cfg.init_from.as_deref().unwrap_or("");
            model_of_init(m, origin, tok, warnings)?
        }
        (None, None) => model_from_spec(&spec, tok)?,
    };
    let cap = req.cap_seq_to_model && resume.is_none();
    cfg.seq = sequence_length(&cfg, &model_cfg, cap, notes)?;
    data.data.reseat(cfg.seq, cfg.seed);
    warnings.extend(data.data.row_warning(cfg.seq));
    data.data.validate(model_cfg.vocab_size, cfg.seq)?;
    if data.data.val_is_empty() && (cfg.eval_every > 0 || cfg.eval_batches > 0) {
        warnings.push("no validation data: evaluation is skipped".into());
    }
    let mut model = Transformer::new(model_cfg);
    let compaction = compaction(&cfg, &model, &data.data, resume.as_ref());
    model.set_compaction(compaction);
    Ok(ResolvedRun {
        cfg,
        model,
        data,
        resume,
        init,
        continues_folder: req.resume && !req.killed_while_starting,
    })
}

/// The settings: the command's, or on `--resume` the checkpoint's (with the changes the
/// command made), or those of a run stopped before its first checkpoint.
fn settings(
    cfg: TrainConfig,
    req: &ResolveRequest,
    warnings: &mut Vec<String>,
) -> Result<(TrainConfig, Option<ResumePoint>)> {
    let paths = req.folder;
    if !req.resume {
        return Ok((cfg, None));
    }
    if paths.has_checkpoint() {
        let (c, r) = resume::resume_config(paths, &cfg, req.given, warnings)?;
        return Ok((c, Some(r)));
    }
    // Killed before its first checkpoint: the run starts again from its saved settings, or,
    // killed before it saved them, from this command's.
    match resume::restart_config(paths, &cfg, req.given, warnings)? {
        Some(c) => {
            warnings.push(format!(
                "{} has no checkpoint yet: the run starts again from update 0 with its saved settings",
                paths.dir.display()
            ));
            Ok((c, None))
        }
        None if req.killed_while_starting => {
            warnings.push(format!(
                "{} holds no saved run yet (it was stopped while starting): starting it afresh with this command's settings",
                paths.dir.display()
            ));
            Ok((cfg, None))
        }
        None => Err(resume::nothing_to_resume(paths)),
    }
}

/// The job's ranks: a resumed run on another number of ranks keeps its sequences per update
/// (through `--accum`).
fn share_among_ranks(
    cfg: &mut TrainConfig,
    resumed: bool,
    ranks: &dyn Collective,
    warnings: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let size = ranks.size();
    if resumed && cfg.outer().is_some() && cfg.ranks.max(1) != size {
        return Err(Error::invalid(format!(
            "this DiLoCo run was trained on {} rank(s): each rank's optimizer state is its own, so it resumes on {} rank(s) only (it was started on {size})",
            cfg.ranks.max(1),
            cfg.ranks.max(1)
        )));
    }
    if resumed && cfg.ranks.max(1) != size {
        let accum = rescale_accum(cfg.batch, cfg.accum, cfg.ranks.max(1), size)?;
        warnings.push(format!(
            "the run was trained on {} rank(s) and continues on {size}: --accum {} -> {accum} keeps {} sequences per update",
            cfg.ranks.max(1),
            cfg.accum,
            cfg.batch * cfg.accum * cfg.ranks.max(1)
        ));
        cfg.accum = accum;
    }
    cfg.ranks = size;
    if let Some(o) = cfg.outer() {
        notes.push(format!(
            "DiLoCo: {}; each rank trains on its own {} sequences per update and the ranks take an outer step (lr {}, Nesterov momentum {}) every {} updates, sending {} weight changes",
            ranks.describe(),
            cfg.batch * cfg.accum,
            o.lr,
            o.momentum,
            o.sync_every,
            cfg.grad_comm
        ));
    } else if size > 1 {
        notes.push(format!(
            "data parallel: {}; rank 0 of {size} writes the run; {} sequences per update ({} per rank); {} gradients",
            ranks.describe(),
            cfg.batch * cfg.accum * size,
            cfg.batch * cfg.accum,
            cfg.grad_comm
        ));
    }
    Ok(())
}

/// The pretrained weights of `--init-from`: those a fresh run starts from, or the frozen
/// model a LoRA run adapts (fresh or resumed).
pub fn load_init(cfg: &TrainConfig, resume: Option<&ResumePoint>) -> Result<Option<LoadedModel>> {
    let lora = cfg.lora_rank.is_some();
    match (resume, &cfg.init_from) {
        (None, Some(p)) => Ok(Some(crate::formats::load_model(Path::new(p))?)),
        (Some(_), Some(p)) if lora => {
            crate::formats::load_model(Path::new(p))
                .map(Some)
                .map_err(|e| {
                    Error::invalid(format!(
                        "the run trains LoRA adapters of {p}, which cannot be read now: {e}"
                    ))
                })
        }
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
    pub data: TrainData,
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
    let source = DataSource::parse(&cfg.data);
    let Some(path) = source.path() else {
        if cfg.tokenizer.is_some() {
            return Err(Error::invalid(
                "the built-in data comes with its own tokenizer; drop --tokenizer or give --data",
            ));
        }
        // A pretrained model reads the built-in data only if it has the built-in tokenizer
        // (a model trained on it, by handgrad).
        let refuse = || {
            Error::invalid(
                "the built-in data has its own tokenizer, which a pretrained model does not share; \
                 tokenize your text with the model's tokenizer (handgrad prepare) and pass --data",
            )
        };
        if cfg.init_from.is_some() && model_tok.is_none() {
            return Err(refuse());
        }
        let b = builtin::ensure(cache_root, log)?;
        if let Some(m) = &model_tok
            && cfg.init_from.is_some()
            && m.id() != tokenizer::load(&b.tokenizer)?.id()
        {
            return Err(refuse());
        }
        let data = TrainData::tokens(b.dataset()?, cfg.seq, cfg.seed);
        let tok = tokenizer::load(&b.tokenizer)?;
        return Ok(DataSetup {
            data,
            tokenizer: Some(tok),
            source: format!("built-in stories ({})", b.dir.display()),
        });
    };
    if is_chat_data(path) {
        return chat_data(cfg, path, model_tok);
    }
    if cfg.chat_template.is_some() {
        return Err(Error::invalid(
            "--chat-template applies to chat data (a .jsonl of conversations or handgrad prepare --chat's output), not to token data",
        ));
    }
    let data = Dataset::open(path, cfg.val_fraction)?;
    let tok_path = match &cfg.tokenizer {
        Some(t) => Some(PathBuf::from(t)),
        None => source.folder().and_then(|dir| tokenizer::find_in_dir(&dir)),
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
        data: TrainData::tokens(data, cfg.seq, cfg.seed),
        tokenizer,
        source: cfg.data.clone(),
    })
}

/// Chat data: conversations rendered with the model's chat template and tokenized with the
/// model's tokenizer (`--tokenizer`, else the one that came with the weights).
fn chat_data(
    cfg: &TrainConfig,
    path: &Path,
    model_tok: Option<Box<dyn Tokenizer>>,
) -> Result<DataSetup> {
    let tokenizer = match (&cfg.tokenizer, model_tok) {
        (Some(p), _) => tokenizer::load(Path::new(p))?,
        (None, Some(t)) => t,
        (None, None) => {
            return Err(Error::invalid(
                "chat data is tokenized with the model's tokenizer: train with --init-from a model that has one, or give --tokenizer",
            ));
        }
    };
    let template = chat_template(
        path,
        cfg.chat_template.as_deref(),
        cfg.init_from.as_deref(),
        cfg.tokenizer.as_deref(),
    )?;
    let encoder = ChatEncoder::new(&template, tokenizer.as_ref())?;
    let chat = ChatData::open(path, &encoder, cfg.val_fraction)?;
    let source = format!("{} (chat, template {})", cfg.data, template.origin());
    Ok(DataSetup {
        data: TrainData::chat(chat, template, cfg.seed),
        tokenizer: Some(tokenizer),
        source,
    })
}

/// The model config for a fresh run from a preset or `config.json`: presets take the
/// tokenizer's vocabulary, explicit configs must cover it.
pub fn model_from_spec(spec: &ModelSpec, tok: Option<&dyn Tokenizer>) -> Result<ModelConfig> {
    let Some(mut mc) = spec.config()? else {
        return Err(Error::invalid(format!(
            "{spec} is a model with weights: give it to --init-from, not --model"
        )));
    };
    let preset = spec.is_preset();
    let spec = spec.to_string();
    if let Some(t) = tok {
        if preset {
            mc.vocab_size = t.vocab_size();
            mc.bos_token_id = t.bos_id();
            mc.eos_token_id = t.eos_id();
        } else if t.vocab_size() > mc.vocab_size {
            return Err(Error::config(
                &spec,
                format!(
                    "field `vocab_size` ({}) is smaller than the tokenizer's vocabulary ({})",
                    mc.vocab_size,
                    t.vocab_size()
                ),
            ));
        }
    }
    mc.validate(&spec)?;
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
    requested: Option<&ModelSpec>,
    tok: Option<&dyn Tokenizer>,
) -> Result<ModelConfig> {
    let meta = &r.checkpoint.meta;
    let mc = meta.model_config.clone();
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
    data: &TrainData,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::distributed::Single;

    /// A headerless uint16 token file (llama2.c's format) of ids below 64 (the tiny vocabulary).
    fn token_file(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        let bytes: Vec<u8> = (0..4000u16).flat_map(|i| (i % 60).to_le_bytes()).collect();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn config(model: &str, data: &Path) -> TrainConfig {
        TrainConfig {
            model: model.into(),
            data: data.display().to_string(),
            seq: 32,
            batch: 2,
            ..TrainConfig::default()
        }
    }

    fn run(cfg: TrainConfig, folder: &Path, resume: bool) -> Result<ResolvedRun> {
        let dir = RunDir::new(folder);
        let given = GivenFlags::default();
        let req = ResolveRequest {
            folder: &dir,
            resume,
            given: &given,
            requested_model: None,
            cache_root: folder,
            cap_seq_to_model: false,
            killed_while_starting: false,
        };
        let (mut w, mut n) = (Vec::new(), Vec::new());
        resolve(cfg, &req, &Single, &mut |_| {}, &mut w, &mut n)
    }

    #[test]
    fn a_preset_on_a_token_file_and_on_a_folder() {
        let d = tempfile::tempdir().unwrap();
        let file = token_file(d.path(), "tokens.bin");
        let r = run(config("tiny", &file), &d.path().join("run"), false).unwrap();
        assert_eq!(r.model.cfg, ModelConfig::preset("tiny").unwrap());
        assert!(r.resume.is_none() && r.init.is_none() && !r.continues_folder);
        assert_eq!(r.data.source, file.display().to_string());
        assert!(r.data.tokenizer.is_none());
        assert!(r.data.data.sizes().1 > 0);

        let folder = d.path().join("shards");
        std::fs::create_dir(&folder).unwrap();
        token_file(&folder, "train.bin");
        token_file(&folder, "val.bin");
        let r = run(config("TINY", &folder), &d.path().join("run2"), false).unwrap();
        assert_eq!(r.model.cfg.dim, 16);
        assert_eq!(r.data.data.sizes().1, 4000);
    }

    #[test]
    fn a_config_json_and_pretrained_weights() {
        let d = tempfile::tempdir().unwrap();
        let file = token_file(d.path(), "tokens.bin");
        let mut shape = ModelConfig::preset("tiny").unwrap();
        shape.dim = 32;
        shape.ffn_dim = 64;
        shape.head_dim = 8;
        let json = d.path().join("config.json");
        std::fs::write(&json, shape.to_hf_json().to_string()).unwrap();
        let r = run(
            config(&json.display().to_string(), &file),
            &d.path().join("a"),
            false,
        )
        .unwrap();
        assert_eq!(r.model.cfg.dim, 32);

        // Weights of that shape saved as a Hugging Face folder: --init-from takes its config.
        let hf = d.path().join("hf");
        let params = crate::model::ParamLayout::new(&shape).init(shape.n_layers, 7);
        crate::formats::hf::save(
            &hf,
            &shape,
            &params,
            crate::formats::hf::ExportDtype::F32,
            None,
            u64::MAX,
        )
        .unwrap();
        let cfg = TrainConfig {
            init_from: Some(hf.display().to_string()),
            ..config("small", &file)
        };
        let r = run(cfg, &d.path().join("b"), false).unwrap();
        assert_eq!(r.model.cfg.dim, 32);
        assert_eq!(r.init.as_ref().unwrap().params, params);
    }

    #[test]
    fn bad_specs_and_sources_are_refused_before_anything_is_written() {
        let d = tempfile::tempdir().unwrap();
        let file = token_file(d.path(), "tokens.bin");
        let folder = d.path().join("run");
        let err = |cfg: TrainConfig, resume: bool| match run(cfg, &folder, resume) {
            Ok(_) => panic!("resolved"),
            Err(e) => e.to_string(),
        };
        let e = err(config("smal", &file), false);
        assert!(e.contains("small"), "{e}");
        let e = err(config("tiny", &d.path().join("missing.bin")), false);
        assert!(e.contains("missing.bin"), "{e}");
        let shape = ModelConfig::preset("tiny").unwrap();
        let hf = d.path().join("hf");
        let params = crate::model::ParamLayout::new(&shape).init(shape.n_layers, 7);
        let f32 = crate::formats::hf::ExportDtype::F32;
        crate::formats::hf::save(&hf, &shape, &params, f32, None, u64::MAX).unwrap();
        let builtin_with_weights = TrainConfig {
            init_from: Some(hf.display().to_string()),
            data: crate::run::BUILTIN_DATA.into(),
            ..config("tiny", &file)
        };
        let e = err(builtin_with_weights, false);
        assert!(e.contains("the built-in data has its own tokenizer"), "{e}");
        let e = err(config("tiny", &file), true);
        assert!(e.contains("no checkpoint to resume from"), "{e}");
        assert!(
            model_from_spec(&ModelSpec::Pretrained("m.gguf".into()), None)
                .unwrap_err()
                .to_string()
                .contains("--init-from")
        );
        assert!(!folder.exists(), "resolving wrote the run folder");
    }
}
