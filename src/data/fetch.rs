//! Downloading datasets over HTTP(S) with resume, size and checksum checks, and tar.gz
//! extraction.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::util::fsutil::create_dir_all;

/// Where the TinyStories archive (the 50 JSON shards of GPT-4 written stories) is published.
pub const TINYSTORIES_URL: &str = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz";

/// What to download and how to check it.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    pub url: String,
    /// The archive file to produce.
    pub dest: PathBuf,
    /// Expected SHA-256 (hex). When absent, the server's `X-Linked-Etag` (Hugging Face LFS
    /// files) is used if it holds one.
    pub sha256: Option<String>,
    /// Attempts before giving up (each resumes where the last one stopped).
    pub retries: usize,
}

/// Progress callback: bytes done, total bytes if known.
pub type Progress<'a> = &'a mut dyn FnMut(u64, Option<u64>);

/// What a download did.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    /// Requests that resumed a partial download with a Range header.
    pub resumed: usize,
    /// Whether the file was already complete and verified.
    pub cached: bool,
}

fn partial_path(dest: &Path) -> PathBuf {
    let mut n = dest
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    n.push(".part");
    dest.with_file_name(n)
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn header(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim_matches('"').to_string())
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Downloads `opts.url` to `opts.dest`, resuming a previous partial download (`DEST.part`)
/// with HTTP Range requests, retrying after dropped connections, and checking the total size
/// (`Content-Length` / `Content-Range` / `X-Linked-Size`) and the SHA-256.
pub fn fetch(opts: &FetchOptions, progress: Progress) -> Result<Fetched> {
    if let Some(dir) = opts.dest.parent()
        && !dir.as_os_str().is_empty()
    {
        create_dir_all(dir)?;
    }
    let marker = opts.dest.with_extension("sha256");
    if let Some(done) = cached(opts, &marker) {
        return Ok(done);
    }
    let part = partial_path(&opts.dest);
    let mut dl = Download {
        expected_total: None,
        expected_sha: opts.sha256.clone().map(|s| s.to_ascii_lowercase()),
        resumed: 0,
    };
    let last_error = dl.run(opts, &part, progress)?;
    if !last_error.is_empty() {
        return Err(Error::invalid(format!(
            "{}: {last_error}; giving up after {} attempts (run again to resume from {})",
            opts.url,
            opts.retries.max(1),
            part.display()
        )));
    }
    dl.finish(opts, &part, &marker)
}

/// The destination, when it is complete: a checksum marker beside it that matches the
/// expected checksum (or any, when none is expected).
fn cached(opts: &FetchOptions, marker: &Path) -> Option<Fetched> {
    if !(opts.dest.exists() && marker.exists()) {
        return None;
    }
    let recorded = std::fs::read_to_string(marker)
        .unwrap_or_default()
        .trim()
        .to_string();
    if !opts
        .sha256
        .as_deref()
        .is_none_or(|want| want.eq_ignore_ascii_case(&recorded))
    {
        return None;
    }
    let bytes = std::fs::metadata(&opts.dest).map(|m| m.len()).unwrap_or(0);
    Some(Fetched {
        path: opts.dest.clone(),
        bytes,
        sha256: recorded,
        resumed: 0,
        cached: true,
    })
}

/// How one request ended.
enum Attempt {
    /// The partial file holds everything the server sent.
    Complete,
    /// The server had nothing left to send (HTTP 416): the partial file may already be
    /// complete (the size and checksum checks tell); an earlier attempt's error stands.
    NothingLeft,
    /// Try again (resuming), for this reason.
    Retry(String),
}

/// What the server said about the file, across attempts.
struct Download {
    expected_total: Option<u64>,
    expected_sha: Option<String>,
    /// Requests answered with a part of the file (resumed).
    resumed: usize,
}

impl Download {
    /// Downloads into `part` over up to `opts.retries` attempts; returns the last attempt's
    /// error (empty when the download completed).
    fn run(&mut self, opts: &FetchOptions, part: &Path, progress: Progress) -> Result<String> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_body(Some(Duration::from_secs(120)))
            .build()
            .new_agent();
        let mut last_error = String::new();
        for attempt in 0..opts.retries.max(1) {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis((200 * attempt as u64).min(5000)));
            }
            let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
            if let Some(total) = self.expected_total
                && have == total
            {
                break;
            }
            match self.attempt(&agent, opts, part, have, progress)? {
                Attempt::Complete => {
                    last_error.clear();
                    break;
                }
                Attempt::NothingLeft => break,
                Attempt::Retry(why) => last_error = why,
            }
        }
        Ok(last_error)
    }

    /// One request, resuming from `have` bytes, appended to `part`.
    fn attempt(
        &mut self,
        agent: &ureq::Agent,
        opts: &FetchOptions,
        part: &Path,
        have: u64,
        progress: Progress,
    ) -> Result<Attempt> {
        let mut req = agent.get(&opts.url);
        if have > 0 {
            req = req.header("Range", &format!("bytes={have}-"));
        }
        let mut resp = match req.call() {
            Ok(r) => r,
            Err(e) => return Ok(Attempt::Retry(format!("request failed: {e}"))),
        };
        let status = resp.status().as_u16();
        if let Some(etag) = header(&resp, "x-linked-etag").or_else(|| header(&resp, "etag"))
            && is_sha256(&etag)
            && self.expected_sha.is_none()
        {
            self.expected_sha = Some(etag.to_ascii_lowercase());
        }
        let (append, total) = match status {
            206 => {
                self.resumed += 1;
                let total = header(&resp, "content-range")
                    .and_then(|r| r.rsplit('/').next().and_then(|t| t.parse::<u64>().ok()));
                (true, total)
            }
            200 => {
                let len = header(&resp, "content-length").and_then(|l| l.parse::<u64>().ok());
                (false, len)
            }
            416 if have > 0 => return Ok(Attempt::NothingLeft),
            s => {
                return Err(Error::invalid(format!(
                    "{}: the server answered HTTP {s}",
                    opts.url
                )));
            }
        };
        let linked = header(&resp, "x-linked-size").and_then(|l| l.parse::<u64>().ok());
        if let Some(t) = total.or(linked) {
            self.expected_total = Some(t);
        }
        let start = if append { have } else { 0 };
        let (done, result) = self.write_body(&mut resp, part, append, start, progress)?;
        Ok(match result {
            Ok(()) if self.expected_total.is_none_or(|t| t == done) => Attempt::Complete,
            Ok(()) => Attempt::Retry(format!("connection closed after {done} bytes")),
            Err(e) => Attempt::Retry(format!("download interrupted after {done} bytes: {e}")),
        })
    }

    /// Writes the response's body into `part` (appended, or replacing it); returns the bytes
    /// the file then holds and how the body's stream ended.
    fn write_body(
        &self,
        resp: &mut ureq::http::Response<ureq::Body>,
        part: &Path,
        append: bool,
        start: u64,
        progress: Progress,
    ) -> Result<(u64, std::io::Result<()>)> {
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(part)
            .map_err(|e| Error::io("opening", part, e))?;
        let mut done = start;
        let mut reader = resp.body_mut().as_reader();
        let mut buf = vec![0u8; 1 << 16];
        let result: std::io::Result<()> = loop {
            match reader.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if let Err(e) = file.write_all(&buf[..n]) {
                        return Err(Error::io("writing", part, e));
                    }
                    done += n as u64;
                    progress(done, self.expected_total);
                }
                Err(e) => break Err(e),
            }
        };
        file.sync_all().map_err(|e| Error::io("syncing", part, e))?;
        Ok((done, result))
    }

    /// Checks the downloaded size and checksum, moves the file into place and writes its
    /// checksum marker.
    fn finish(self, opts: &FetchOptions, part: &Path, marker: &Path) -> Result<Fetched> {
        let bytes = std::fs::metadata(part)
            .map_err(|e| Error::io("reading metadata of", part, e))?
            .len();
        if let Some(t) = self.expected_total
            && t != bytes
        {
            return Err(Error::data(
                part,
                format!("size check failed: expected {t} bytes, got {bytes}"),
            ));
        }
        let sha = sha256_file(part)?;
        if let Some(want) = &self.expected_sha
            && *want != sha
        {
            let _ = std::fs::remove_file(part);
            return Err(Error::data(
                &opts.dest,
                format!(
                    "checksum mismatch: expected SHA-256 {want}, got {sha}; the download was deleted"
                ),
            ));
        }
        std::fs::rename(part, &opts.dest)
            .map_err(|e| Error::io("renaming into place", &opts.dest, e))?;
        std::fs::write(marker, format!("{sha}\n")).map_err(|e| Error::io("writing", marker, e))?;
        Ok(Fetched {
            path: opts.dest.clone(),
            bytes,
            sha256: sha,
            resumed: self.resumed,
            cached: false,
        })
    }
}

/// Extracts the regular files of a `.tar.gz` archive into `dir` (paths that would escape
/// `dir` are refused). Returns the extracted files.
pub fn extract_tar_gz(archive: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let f = File::open(archive).map_err(|e| Error::io("opening", archive, e))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    create_dir_all(dir)?;
    let mut out = Vec::new();
    let entries = tar
        .entries()
        .map_err(|e| Error::data(archive, format!("not a tar.gz archive: {e}")))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| Error::data(archive, format!("corrupted archive: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let rel = entry
            .path()
            .map_err(|e| Error::data(archive, format!("bad entry name: {e}")))?
            .into_owned();
        if rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(Error::data(
                archive,
                format!("entry '{}' would escape the target folder", rel.display()),
            ));
        }
        let target = dir.join(&rel);
        if let Some(p) = target.parent() {
            create_dir_all(p)?;
        }
        let mut w = File::create(&target).map_err(|e| Error::io("creating", &target, e))?;
        std::io::copy(&mut entry, &mut w)
            .map_err(|e| Error::data(archive, format!("extracting {}: {e}", rel.display())))?;
        out.push(target);
    }
    if out.is_empty() {
        return Err(Error::data(archive, "the archive holds no files"));
    }
    out.sort();
    Ok(out)
}
