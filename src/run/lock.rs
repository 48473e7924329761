//! One trainer per run folder: `RUN_DIR/.lock`, held with an advisory lock (`flock` on Unix)
//! for as long as a trainer runs, and holding the owner's PID, host and start time so that a
//! second trainer is refused with a message naming the first.
//!
//! The operating system drops the advisory lock when its process dies, however it dies, so a
//! lock left by a killed trainer is never mistaken for a live one: the file is still there
//! (with the dead owner's details) but nobody holds it, and the next trainer takes it over
//! with a warning. Readers (`dashboard`, `generate`, `info`) never take the lock.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The lock file's name inside a run folder.
pub const LOCK_FILE: &str = ".lock";

/// Who holds (or held) a run folder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockOwner {
    pub pid: u32,
    pub host: String,
    /// Unix seconds.
    pub started: u64,
}

impl LockOwner {
    fn me() -> Self {
        LockOwner {
            pid: std::process::id(),
            host: hostname(),
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    fn describe(&self) -> String {
        let ago = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs().saturating_sub(self.started))
            .unwrap_or(0);
        let ago = match ago {
            0..120 => format!("{ago} s"),
            120..7200 => format!("{} min", ago / 60),
            _ => format!("{:.1} h", ago as f64 / 3600.0),
        };
        format!("process {} on {}, started {ago} ago", self.pid, self.host)
    }
}

/// The machine's name, for lock messages.
pub fn hostname() -> String {
    for p in ["/proc/sys/kernel/hostname", "/etc/hostname"] {
        if let Ok(s) = std::fs::read_to_string(p)
            && !s.trim().is_empty()
        {
            return s.trim().to_string();
        }
    }
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::process::Command::new("hostname")
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "an unknown host".into())
}

/// A held run lock; dropping it releases the lock and removes the file (and the run folder,
/// when this lock created it and nothing else was written there).
#[derive(Debug)]
pub struct RunLock {
    file: Option<File>,
    path: PathBuf,
    /// The folders this lock created (the run folder and any missing parents, such as
    /// `runs/`), deepest first.
    created_dirs: Vec<PathBuf>,
}

impl RunLock {
    /// Takes the lock of `dir` (creating the folder if needed). A lock held by a live process
    /// is an error naming it; one left by a process that died is taken over, with a warning
    /// pushed to `warnings`.
    pub fn acquire(dir: &Path, warnings: &mut Vec<String>) -> Result<Self> {
        let created_dirs: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
            .map(Path::to_path_buf)
            .collect();
        if !created_dirs.is_empty() {
            crate::util::fsutil::create_dir_all(dir)?;
        }
        let path = dir.join(LOCK_FILE);
        let mut guard = RunLock {
            file: None,
            path: path.clone(),
            created_dirs,
        };
        // The file can be removed by its releasing owner between our open and our lock: then
        // we hold a lock on a name that no longer exists, and try again.
        for _ in 0..10 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io("opening the run lock", &path, e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let owner = read_owner(&mut file)
                        .map(|o| o.describe())
                        .unwrap_or_else(|| "another process".into());
                    return Err(Error::invalid(format!(
                        "{} is in use by another trainer ({owner}); stop it before training here, or choose another --run-dir",
                        dir.display()
                    )));
                }
                Err(TryLockError::Error(e)) => {
                    return Err(Error::io("locking the run folder", &path, e));
                }
            }
            if !same_file(&file, &path) {
                continue;
            }
            if let Some(prev) = read_owner(&mut file) {
                warnings.push(format!(
                    "took over the lock of {} from {}, which is no longer running (it did not exit cleanly; training resumes from its last checkpoint)",
                    dir.display(),
                    prev.describe()
                ));
            }
            let me = serde_json::to_vec(&LockOwner::me())
                .map_err(|e| Error::json("encoding the run lock", e))?;
            (|| -> std::io::Result<()> {
                file.set_len(0)?;
                file.seek(SeekFrom::Start(0))?;
                file.write_all(&me)?;
                file.write_all(b"\n")?;
                file.sync_all()
            })()
            .map_err(|e| Error::io("writing the run lock", &path, e))?;
            guard.file = Some(file);
            return Ok(guard);
        }
        Err(Error::invalid(format!(
            "could not lock {}: its lock file keeps being replaced",
            dir.display()
        )))
    }

    /// Who holds `dir` now, if a live process does (for readers that want to say so).
    pub fn holder(dir: &Path) -> Option<LockOwner> {
        let path = dir.join(LOCK_FILE);
        let mut file = File::open(&path).ok()?;
        match file.try_lock_shared() {
            Err(TryLockError::WouldBlock) => read_owner(&mut file),
            _ => None,
        }
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        if let Some(f) = self.file.take() {
            // Removed while still held, so nobody can lock the old file in between.
            let _ = std::fs::remove_file(&self.path);
            drop(f);
        }
        for d in &self.created_dirs {
            // Only succeeds if nothing was written: a refused run leaves no empty folder
            // (nor an empty `runs/`).
            if std::fs::remove_dir(d).is_err() {
                break;
            }
        }
    }
}

fn read_owner(file: &mut File) -> Option<LockOwner> {
    let mut s = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut s).ok()?;
    serde_json::from_str(s.trim()).ok()
}

#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &File, path: &Path) -> bool {
    path.exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_and_a_released_one_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let mut w = Vec::new();
        let a = RunLock::acquire(&run, &mut w).unwrap();
        assert!(w.is_empty());
        assert_eq!(RunLock::holder(&run).unwrap().pid, std::process::id());
        // flock locks belong to open files, so a second open in this process conflicts too.
        let e = RunLock::acquire(&run, &mut w).unwrap_err().to_string();
        assert!(e.contains("in use by another trainer"), "{e}");
        assert!(
            e.contains(&format!("process {}", std::process::id())),
            "{e}"
        );
        drop(a);
        assert!(!run.join(LOCK_FILE).exists());
        // The folder it created, still empty, is gone again.
        assert!(!run.exists());
        assert!(RunLock::holder(&run).is_none());
    }

    #[test]
    fn a_dead_owners_lock_is_taken_over_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let stale = LockOwner {
            pid: 999_999,
            host: "elsewhere".into(),
            started: 0,
        };
        std::fs::write(
            dir.path().join(LOCK_FILE),
            serde_json::to_vec(&stale).unwrap(),
        )
        .unwrap();
        let mut w = Vec::new();
        let lock = RunLock::acquire(dir.path(), &mut w).unwrap();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("process 999999 on elsewhere"), "{}", w[0]);
        drop(lock);
        // The folder existed before: it stays.
        assert!(dir.path().exists());
    }
}
