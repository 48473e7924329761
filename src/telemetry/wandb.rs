//! Weights & Biases logging through a small Python sidecar (there is no Rust SDK): the
//! official `wandb` package, fed handgrad's event records on its standard input. The sidecar
//! is `tools/wandb/handgrad_wandb.py`, built into the binary. Without python3 or wandb, one
//! warning says how to install it and training goes on; if the sidecar dies, the sink fails
//! and is detached (one warning), and training goes on.

use std::io::Write;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use serde::{Deserialize, Serialize};

use super::events::Record;
use super::sinks::EventSink;
use crate::error::{Error, Result};

/// The sidecar's source.
pub const SIDECAR: &str = include_str!("../../tools/wandb/handgrad_wandb.py");

/// `--wandb-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WandbMode {
    /// Sync to the W&B server as the run goes.
    #[default]
    Online,
    /// Write the run locally (`wandb sync` uploads it later).
    Offline,
}

/// Where and how to log.
#[derive(Debug, Clone)]
pub struct WandbOptions {
    pub project: String,
    pub name: Option<String>,
    pub mode: WandbMode,
    /// The folder wandb writes into (the run folder).
    pub dir: std::path::PathBuf,
}

/// Feeds the sidecar.
pub struct WandbSink {
    child: Child,
    stdin: Option<ChildStdin>,
}

/// Whether `python3` can import `wandb`; the reason when not.
pub fn check_python() -> std::result::Result<(), String> {
    match Command::new("python3")
        .args(["-c", "import wandb"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(_) => Err("python3 cannot import wandb (pip install wandb)".into()),
        Err(_) => {
            Err("python3 is not installed (it runs the W&B sidecar; then pip install wandb)".into())
        }
    }
}

impl WandbSink {
    /// Starts the sidecar (check `check_python` first for a friendlier message).
    pub fn start(o: &WandbOptions) -> Result<Self> {
        let mode = match o.mode {
            WandbMode::Online => "online",
            WandbMode::Offline => "offline",
        };
        let mut cmd = Command::new("python3");
        cmd.args(["-u", "-c", SIDECAR, "--project", &o.project, "--mode", mode])
            .arg("--dir")
            .arg(&o.dir);
        if let Some(n) = &o.name {
            cmd.args(["--name", n]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::io("starting the W&B sidecar", Path::new("python3"), e))?;
        let stdin = child.stdin.take();
        Ok(WandbSink { child, stdin })
    }
}

impl EventSink for WandbSink {
    fn name(&self) -> String {
        "W&B sidecar".into()
    }

    fn emit(&mut self, record: &Record) -> Result<()> {
        let line =
            serde_json::to_string(record).map_err(|e| Error::json("encoding an event", e))?;
        let Some(stdin) = &mut self.stdin else {
            return Err(Error::invalid("the W&B sidecar is closed"));
        };
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(Error::invalid(format!("the W&B sidecar exited ({status})")));
        }
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .map_err(|e| Error::io("writing to", Path::new("the W&B sidecar"), e))
    }

    fn finish(&mut self) -> Result<()> {
        // End of input: the sidecar finishes the W&B run and exits.
        drop(self.stdin.take());
        self.child
            .wait()
            .map_err(|e| Error::io("waiting for", Path::new("the W&B sidecar"), e))?;
        Ok(())
    }
}
