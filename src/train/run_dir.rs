//! The run folder: its paths, finding the checkpoint to resume from, and writing the files a
//! fresh run starts with.

use std::path::{Path, PathBuf};

use super::config::TrainConfig;
use crate::error::{Error, Result};
use crate::formats::checkpoint::{
    Checkpoint, RUN_BEST, RUN_CHECKPOINTS, RUN_LATEST, RUN_TRAIN_CONFIG,
};
use crate::model::ModelConfig;
use crate::tokenizer::Tokenizer;
use crate::util::fsutil::{create_dir_all, write_atomic};

/// Paths inside a run directory.
#[derive(Debug, Clone)]
pub struct RunPaths {
    pub dir: PathBuf,
}

impl RunPaths {
    /// An existing run folder to read from (`generate`, `eval`): a missing folder, or one that
    /// is not a run, is refused in one line.
    pub fn existing(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::invalid(format!(
                "there is no run folder {} (runs are in runs/ unless --run-dir chose another)",
                dir.display()
            )));
        }
        let p = RunPaths {
            dir: dir.to_path_buf(),
        };
        if !p.train_config().exists() && !p.checkpoints().exists() {
            return Err(Error::invalid(format!(
                "{} is not a handgrad run folder (it has no {RUN_TRAIN_CONFIG}); for a model file or folder use --model",
                dir.display()
            )));
        }
        Ok(p)
    }

    /// The checkpoint to read: `latest`, or `best` with `best`; an error when the run has not
    /// saved it yet.
    pub fn checkpoint_to_read(&self, best: bool) -> Result<PathBuf> {
        let path = if best { self.best() } else { self.latest() };
        if path.exists() {
            return Ok(path);
        }
        Err(Error::invalid(format!(
            "the run in {} has no {} checkpoint yet (it saves one every --save-every updates and when it ends)",
            self.dir.display(),
            if best { RUN_BEST } else { RUN_LATEST }
        )))
    }

    pub fn train_config(&self) -> PathBuf {
        self.dir.join(RUN_TRAIN_CONFIG)
    }
    pub fn checkpoints(&self) -> PathBuf {
        self.dir.join(RUN_CHECKPOINTS)
    }
    pub fn latest(&self) -> PathBuf {
        self.checkpoints().join(RUN_LATEST)
    }
    pub fn latest_prev(&self) -> PathBuf {
        self.checkpoints().join(format!("{RUN_LATEST}.prev"))
    }
    pub fn best(&self) -> PathBuf {
        self.checkpoints().join(RUN_BEST)
    }
    pub fn events(&self) -> PathBuf {
        self.dir.join("events.jsonl")
    }

    /// Whether a checkpoint to resume from was ever written (`latest` or `latest.prev`).
    pub fn has_checkpoint(&self) -> bool {
        self.latest().exists() || self.latest_prev().exists()
    }

    /// Whether the folder already holds a run.
    pub fn holds_run(&self) -> bool {
        self.latest().exists() || self.events().exists()
    }
}

/// Whether `dir` holds a trainer's lock file and nothing else but unfinished temporary files:
/// what a trainer killed while starting leaves behind.
pub fn holds_only_a_lock(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let mut lock = false;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == super::run_lock::LOCK_FILE {
            lock = true;
        } else if !(name.contains(".tmp-") || name.starts_with(".write-test-")) {
            return false;
        }
    }
    lock
}

/// Loads the newest valid "latest" checkpoint of a run: `latest`, or `latest.prev` (with a
/// warning) when `latest` is damaged or missing.
pub fn load_latest(paths: &RunPaths, warnings: &mut Vec<String>) -> Result<(Checkpoint, PathBuf)> {
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
    paths: &RunPaths,
    resume: bool,
    cfg: &TrainConfig,
    model: &ModelConfig,
    tokenizer: Option<&dyn Tokenizer>,
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
    if !resume || !paths.dir.join("config.json").exists() {
        write_json(
            &paths.dir.join("config.json"),
            &model.to_hf_json(),
            "encoding config.json",
        )?;
        if let Some(t) = tokenizer {
            write_atomic(&paths.dir.join(t.file_name()), |f| {
                std::io::Write::write_all(f, t.file_bytes())
            })?;
        }
    }
    Ok(())
}
