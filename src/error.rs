//! The library's error type. Every fallible operation returns [`Result`], and every error carries
//! enough context (a file, a field, a position) to be reported in one clear line by the CLI.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in handgrad, with context.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model configuration is missing a field or is inconsistent.
    #[error("model config{}: {message}", origin_suffix(.origin))]
    Config { origin: String, message: String },
    /// A file's contents are malformed (bad magic, truncated, wrong sizes, bad checksum, ...).
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// Training data is unusable.
    #[error("data {path}: {message}")]
    Data { path: PathBuf, message: String },
    /// A tokenizer could not be loaded or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A checkpoint does not match what was asked of it.
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// A user-supplied argument is invalid.
    #[error("{0}")]
    Invalid(String),
    /// JSON (de)serialisation failed.
    #[error("{context}: {source}")]
    Json {
        context: String,
        #[source]
        source: serde_json::Error,
    },
    /// A compute backend failed (a program did not compile, an evaluation failed).
    #[error("backend {backend}: {message}")]
    Backend { backend: String, message: String },
    /// The Neural Engine compiler's per-process budget would be passed: the process must
    /// restart (from its last checkpoint) before compiling more.
    #[error(
        "the Neural Engine compiler's budget for this process is spent: {used} of {limit} compiles used, {needed} more needed (the compiler leaks; a new process starts afresh)"
    )]
    AneCompileBudget {
        used: usize,
        needed: usize,
        limit: usize,
    },
    /// The run must continue in a fresh process (the Neural Engine compiler's budget of this
    /// one is spent); the command line re-executes itself with `restarts` in its environment.
    #[error("{reason}; restart handgrad to continue")]
    RestartProcess { restarts: u32, reason: String },
    /// Training was interrupted by the user (Ctrl-C) after saving.
    #[error("interrupted")]
    Interrupted,
}

fn origin_suffix(origin: &str) -> String {
    if origin.is_empty() {
        String::new()
    } else {
        format!(" {origin}")
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error with the action that failed and the path it failed on.
    pub fn io(action: &'static str, path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A malformed-file error.
    pub fn format(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    /// A data error.
    pub fn data(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::Data {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    /// A checkpoint error.
    pub fn checkpoint(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    /// A config error.
    pub fn config(origin: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            origin: origin.into(),
            message: message.into(),
        }
    }

    /// A backend failure.
    pub fn backend(backend: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Backend {
            backend: backend.into(),
            message: message.into(),
        }
    }

    /// An invalid-argument error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::Invalid(message.into())
    }

    /// A JSON error with context.
    pub fn json(context: impl Into<String>, source: serde_json::Error) -> Self {
        Error::Json {
            context: context.into(),
            source,
        }
    }
}
