//! The files of a run folder that the trainer reads and writes: the checkpoint to resume
//! from, and the files a fresh run starts with. Paths come from [`RunDir`].

use std::path::{Path, PathBuf};

use crate::data::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::formats::checkpoint::Checkpoint;
use crate::model::ModelConfig;
use crate::run::{RunDir, TrainConfig};
use crate::tokenizer::Tokenizer;
use crate::util::fsutil::{create_dir_all, write_atomic};

/// Loads the newest valid "latest" checkpoint of a run: `latest`, or `latest.prev` (with a
/// warning) when `latest` is damaged or missing.
pub fn load_latest(paths: &RunDir, warnings: &mut Vec<String>) -> Result<(Checkpoint, PathBuf)> {
    let latest = paths.latest();
    match Checkpoint::load(&latest) {
        Ok(c) => Ok((c, latest)),
        Err(e) => {
            let prev = paths.latest_prev();
            if prev.exists() {
                let c = Checkpoint::load(&prev)?;
                warnings.push(format!(
                    "{e}; resuming from the previous checkpoint {}",
                    prev.display()
                ));
                Ok((c, prev))
            } else if !latest.exists() {
                Err(Error::checkpoint(
                    &latest,
                    format!("no checkpoint to resume from in {}", paths.dir.display()),
                ))
            } else {
                Err(e)
            }
        }
    }
}

fn check_writable(dir: &Path) -> Result<()> {
    create_dir_all(dir)?;
    let probe = dir.join(format!(".write-test-{}", std::process::id()));
    std::fs::write(&probe, b"ok").map_err(|e| Error::io("writing into the run folder", dir, e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn write_json(path: &Path, value: &impl serde::Serialize, what: &str) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::json(what, e))?;
    write_atomic(path, |f| std::io::Write::write_all(f, &bytes))
}

/// Makes the run folder ready: refuses to overwrite another run (unless resuming), checks that
/// it can be written, and writes `train_config.json` (and, for a fresh run, `config.json` and
/// the tokenizer file).
pub fn prepare(
    paths: &RunDir,
    resume: bool,
    cfg: &TrainConfig,
    model: &ModelConfig,
    tokenizer: Option<&dyn Tokenizer>,
    chat: Option<&ChatTemplate>,
) -> Result<()> {
    if !resume && paths.holds_run() {
        return Err(Error::invalid(format!(
            "{} already holds a training run; continue it with --resume or choose another --run-dir",
            paths.dir.display()
        )));
    }
    check_writable(&paths.dir)?;
    create_dir_all(&paths.checkpoints())?;
    write_json(&paths.train_config(), cfg, "encoding the training config")?;
    // A fresh run writes them; a resumed one only if they are missing (a run restarted before
    // its first checkpoint, a folder tidied by hand).
    if !resume || !paths.model_config().exists() {
        write_json(
            &paths.model_config(),
            &model.to_hf_json(),
            "encoding config.json",
        )?;
        if let Some(t) = tokenizer {
            write_atomic(&paths.tokenizer_file(t.file_name()), |f| {
                std::io::Write::write_all(f, t.file_bytes())
            })?;
        }
    }
    // A chat run keeps its template where Hugging Face folders keep it, so `generate --chat`
    // and `convert` find it.
    if let Some(t) = chat {
        let config = serde_json::json!({
            "chat_template": t.source(),
            "bos_token": t.bos_token(),
            "eos_token": t.eos_token(),
        });
        write_json(
            &paths.tokenizer_file("tokenizer_config.json"),
            &config,
            "encoding tokenizer_config.json",
        )?;
    }
    Ok(())
}
