//! The run folder: the one place that spells its layout.
//!
//! ```text
//! runs/NAME/
//!   train_config.json     the run's TrainConfig (what `--resume` and `--config` read)
//!   config.json           the model's Hugging Face config
//!   tokenizer.json | tokenizer.bin   the tokenizer the run trains with
//!   events.jsonl          every event of every session
//!   checkpoints/latest    written every --save-every updates and at the end (latest.prev: the one before)
//!   checkpoints/best      the best validation loss so far
//!   .lock                 held by the trainer that owns the folder
//! ```

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where a run folder keeps its checkpoints.
const CHECKPOINTS: &str = "checkpoints";
/// The checkpoint a run writes as it goes.
const LATEST: &str = "latest";
/// The checkpoint of the best validation loss.
const BEST: &str = "best";
/// The training settings a run folder holds.
const TRAIN_CONFIG: &str = "train_config.json";
/// The model's configuration, in Hugging Face's format.
const MODEL_CONFIG: &str = "config.json";
/// The event log.
const EVENTS: &str = "events.jsonl";

/// A run folder and every path in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    pub dir: PathBuf,
}

impl RunDir {
    /// The run folder at `dir` (which need not exist yet).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        RunDir { dir: dir.into() }
    }

    /// Whether `dir` looks like a run folder (it has its training settings or checkpoints),
    /// as opposed to a model folder.
    pub fn is_run_folder(dir: &Path) -> bool {
        let d = RunDir::new(dir);
        d.train_config().exists() || d.checkpoints().is_dir()
    }

    /// An existing run folder to read from (`generate`, `eval`): a missing folder, or one that
    /// is not a run, is refused in one line.
    pub fn existing(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::invalid(format!(
                "there is no run folder {} (runs are in runs/ unless --run-dir chose another)",
                dir.display()
            )));
        }
        let p = RunDir::new(dir);
        if !p.train_config().exists() && !p.checkpoints().exists() {
            return Err(Error::invalid(format!(
                "{} is not a handgrad run folder (it has no {TRAIN_CONFIG}); for a model file or folder use --model",
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
            if best { BEST } else { LATEST }
        )))
    }

    pub fn train_config(&self) -> PathBuf {
        self.dir.join(TRAIN_CONFIG)
    }
    pub fn model_config(&self) -> PathBuf {
        self.dir.join(MODEL_CONFIG)
    }
    /// The tokenizer file of the run, by its file name (`tokenizer.json`, `tokenizer.bin`).
    pub fn tokenizer_file(&self, file_name: &str) -> PathBuf {
        self.dir.join(file_name)
    }
    pub fn checkpoints(&self) -> PathBuf {
        self.dir.join(CHECKPOINTS)
    }
    pub fn latest(&self) -> PathBuf {
        self.checkpoints().join(LATEST)
    }
    pub fn latest_prev(&self) -> PathBuf {
        self.checkpoints().join(format!("{LATEST}.prev"))
    }
    pub fn best(&self) -> PathBuf {
        self.checkpoints().join(BEST)
    }
    pub fn events(&self) -> PathBuf {
        self.dir.join(EVENTS)
    }
    /// A LoRA run's latest adapters as a PEFT folder (`adapter_model.safetensors`,
    /// `adapter_config.json`), written with each `latest` checkpoint.
    pub fn adapter(&self) -> PathBuf {
        self.dir.join("adapter")
    }
    pub fn lock(&self) -> PathBuf {
        self.dir.join(super::lock::LOCK_FILE)
    }

    /// The settings the run saved (`train_config.json`).
    pub fn saved_config(&self) -> Result<super::TrainConfig> {
        let path = self.train_config();
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io("reading", &path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::json(format!("reading {}", path.display()), e))
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

impl RunDir {
    /// Whether the folder holds a trainer's lock file and nothing else but unfinished
    /// temporary files: what a trainer killed while starting leaves behind.
    pub fn holds_only_a_lock(&self) -> bool {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return false;
        };
        let mut lock = false;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == super::lock::LOCK_FILE {
                lock = true;
            } else if !(name.contains(".tmp-") || name.starts_with(".write-test-")) {
                return false;
            }
        }
        lock
    }
}
