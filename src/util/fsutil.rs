//! Crash-safe file writing.

use std::fs::{File, OpenOptions};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// A suffix unique to this process and call, for temporary names.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The temporary name used while `path` is being written.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", unique_suffix()));
    path.with_file_name(name)
}

/// Writes a file atomically: the content goes to a temporary file in the same folder, which is
/// flushed and fsynced, then renamed over `path`, and the folder is fsynced so the rename
/// survives a crash. Readers see either the old file or the complete new one.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    write_atomic_keeping(path, None, write)
}

/// [`write_atomic`], and when `previous` is given the file being replaced is kept there. The
/// order makes every moment safe: the new content is complete and fsynced first; then the old
/// file gets its second name (a hard link, so `path` never stops existing; a copy where the
/// filesystem has no hard links); then the new file is renamed over `path`.
pub fn write_atomic_keeping(
    path: &Path,
    previous: Option<&Path>,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| -> std::io::Result<()> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        fault::check_write(path)?;
        fault::slow_write();
        file.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io("writing", path, e));
    }
    if let Some(prev) = previous
        && path.exists()
    {
        keep_as(path, prev).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io("keeping the previous version of", path, e)
        })?;
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("renaming into place", path, e)
    })?;
    sync_dir(path.parent().unwrap_or(Path::new(".")));
    Ok(())
}

/// Gives `path`'s current content the name `prev` (atomically replacing what `prev` was).
fn keep_as(path: &Path, prev: &Path) -> std::io::Result<()> {
    let staged = temp_path(prev);
    if std::fs::hard_link(path, &staged).is_err() {
        std::fs::copy(path, &staged)?;
        File::open(&staged)?.sync_all()?;
    }
    let r = std::fs::rename(&staged, prev);
    // Renaming a link onto another name of the same file does nothing (POSIX allows it): the
    // staged name may still be there.
    let _ = std::fs::remove_file(&staged);
    r
}

/// Removes the temporary files (`NAME.tmp-PID-N`) a killed process left in a folder; returns
/// how many. Only call it while owning the folder (the run lock).
pub fn remove_stale_temp_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        if is_temp_name(&name.to_string_lossy())
            && e.file_type().is_ok_and(|t| t.is_file())
            && std::fs::remove_file(e.path()).is_ok()
        {
            n += 1;
        }
    }
    n
}

/// Whether a file name is one of [`temp_path`]'s: `NAME.tmp-PID-N`.
fn is_temp_name(name: &str) -> bool {
    let Some((_, tail)) = name.rsplit_once(".tmp-") else {
        return false;
    };
    let mut parts = tail.split('-');
    let digits =
        |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    digits(parts.next()) && digits(parts.next()) && parts.next().is_none()
}

/// Faults injected by tests through environment variables, so a real `handgrad` process can be
/// made to hit a full disk or be slow while writing (to be killed mid-write). Without the
/// variables these do nothing.
pub mod fault {
    use std::path::Path;
    use std::sync::Mutex;

    /// `HANDGRAD_TEST_DISK_FULL=PATTERN[@N]`: the N-th (default first) and every later write of
    /// a file whose path contains PATTERN fails with "No space left on device".
    pub const DISK_FULL_VAR: &str = "HANDGRAD_TEST_DISK_FULL";
    /// `HANDGRAD_TEST_SLOW_WRITES_MS=MS`: every atomic write sleeps this long before its fsync.
    pub const SLOW_WRITES_VAR: &str = "HANDGRAD_TEST_SLOW_WRITES_MS";

    static MATCHED: Mutex<u64> = Mutex::new(0);

    /// Fails (ENOSPC) when `HANDGRAD_TEST_DISK_FULL` says this write should.
    pub fn check_write(path: &Path) -> std::io::Result<()> {
        let Ok(spec) = std::env::var(DISK_FULL_VAR) else {
            return Ok(());
        };
        let (pattern, nth) = match spec.rsplit_once('@') {
            Some((p, n)) => (p.to_string(), n.parse::<u64>().unwrap_or(1)),
            None => (spec.clone(), 1),
        };
        if !path.to_string_lossy().contains(&pattern) {
            return Ok(());
        }
        let mut m = MATCHED.lock().unwrap_or_else(|e| e.into_inner());
        *m += 1;
        if *m >= nth {
            // ENOSPC on Linux and macOS.
            return Err(std::io::Error::from_raw_os_error(28));
        }
        Ok(())
    }

    /// Sleeps when `HANDGRAD_TEST_SLOW_WRITES_MS` is set.
    pub fn slow_write() {
        if let Some(ms) = std::env::var(SLOW_WRITES_VAR)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }
}

/// Fsyncs a directory (best effort: not every platform allows opening one).
pub fn sync_dir(dir: &Path) {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Creates a folder and its parents, with a clear error.
pub fn create_dir_all(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating folder", dir, e))
}
