//! Turning text corpora into token shards: documents are read (plain text, JSONL, TinyStories
//! JSON), tokenized in parallel, joined with the tokenizer's BOS/EOS, and written as handgrad
//! shards (uint16 ids when the vocabulary fits, else uint32) with a validation shard.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

use super::documents::{TextSplit, documents_of};
use super::shards::write_shard;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use crate::util::fsutil::{create_dir_all, write_atomic};

/// Options of [`prepare`].
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    /// Fraction of documents held out for validation (every `round(1/f)`-th document).
    pub val_fraction: f64,
    /// Tokens per training shard file.
    pub shard_tokens: usize,
    pub split: TextSplit,
    /// Append EOS after each document even when the tokenizer has a BOS.
    pub force_eos: bool,
}

/// What [`prepare`] did.
#[derive(Debug, Clone, Default)]
pub struct PrepareSummary {
    pub documents: usize,
    pub val_documents: usize,
    pub bytes: u64,
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub files: Vec<PathBuf>,
    pub seconds: f64,
}

impl PrepareSummary {
    /// Tokens per input byte (a measure of the tokenizer's compression on this corpus).
    pub fn tokens_per_byte(&self) -> f64 {
        (self.train_tokens + self.val_tokens) as f64 / self.bytes.max(1) as f64
    }
}

/// Documents handed to the tokenizer at once.
const BATCH_DOCS: usize = 4096;

struct ShardWriter<'a> {
    dir: &'a Path,
    buf: Vec<u32>,
    limit: usize,
    index: usize,
    vocab: usize,
    id: String,
    files: Vec<PathBuf>,
    total: usize,
}

impl ShardWriter<'_> {
    fn push(&mut self, ids: &[u32]) -> Result<()> {
        self.buf.extend_from_slice(ids);
        self.total += ids.len();
        while self.buf.len() >= self.limit {
            let rest = self.buf.split_off(self.limit);
            self.flush()?;
            self.buf = rest;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(format!("train-{:05}.bin", self.index));
        write_shard(&path, &self.buf, self.vocab, &self.id)?;
        self.files.push(path);
        self.index += 1;
        self.buf.clear();
        Ok(())
    }
}

/// Tokenizes the inputs into `opts.out` (`train-NNNNN.bin`, `val.bin`, and a copy of the
/// tokenizer file). `progress` is called with the input bytes processed so far.
pub fn prepare(
    tok: &dyn Tokenizer,
    opts: &PrepareOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<PrepareSummary> {
    let t0 = Instant::now();
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(Error::invalid(format!(
            "--val-fraction must be in [0, 1), got {}",
            opts.val_fraction
        )));
    }
    if opts.shard_tokens == 0 {
        return Err(Error::invalid("--shard-tokens must be at least 1"));
    }
    if opts.out.exists() {
        let existing = std::fs::read_dir(&opts.out)
            .map_err(|e| Error::io("listing", &opts.out, e))?
            .filter_map(|e| e.ok())
            .any(|e| e.path().extension().is_some_and(|x| x == "bin"));
        if existing {
            return Err(Error::invalid(format!(
                "{} already holds token files; choose an empty --out folder",
                opts.out.display()
            )));
        }
    }
    create_dir_all(&opts.out)?;
    let (bos, eos) = (tok.bos_id(), tok.eos_id());
    let add_eos = eos.is_some() && (bos.is_none() || opts.force_eos);
    let val_every = if opts.val_fraction > 0.0 {
        (1.0 / opts.val_fraction).round().max(1.0) as usize
    } else {
        0
    };
    let mut train = ShardWriter {
        dir: &opts.out,
        buf: Vec::new(),
        limit: opts.shard_tokens,
        index: 0,
        vocab: tok.vocab_size(),
        id: tok.id().to_string(),
        files: Vec::new(),
        total: 0,
    };
    let mut val: Vec<u32> = Vec::new();
    let mut s = PrepareSummary::default();
    for path in &opts.inputs {
        let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
        let len = bytes.len() as u64;
        let text = String::from_utf8(bytes).map_err(|e| {
            Error::data(
                path,
                format!(
                    "not UTF-8 text (invalid byte at offset {})",
                    e.utf8_error().valid_up_to()
                ),
            )
        })?;
        let docs = documents_of(path, &text, &opts.split)?;
        drop(text);
        for batch in docs.chunks(BATCH_DOCS) {
            let encoded: Vec<Vec<u32>> = batch
                .par_iter()
                .map(|d| {
                    let mut ids = Vec::with_capacity(d.len() / 3 + 2);
                    if let Some(b) = bos {
                        ids.push(b);
                    }
                    ids.extend(tok.encode(d)?);
                    if add_eos && let Some(e) = eos {
                        ids.push(e);
                    }
                    Ok(ids)
                })
                .collect::<Result<_>>()?;
            for ids in encoded {
                let i = s.documents;
                s.documents += 1;
                if val_every > 0 && i % val_every == val_every - 1 {
                    s.val_documents += 1;
                    val.extend_from_slice(&ids);
                } else {
                    train.push(&ids)?;
                }
            }
        }
        s.bytes += len;
        progress(s.bytes);
    }
    train.flush()?;
    if s.documents == 0 {
        return Err(Error::invalid("the inputs hold no documents"));
    }
    if !val.is_empty() {
        let p = opts.out.join("val.bin");
        write_shard(&p, &val, tok.vocab_size(), tok.id())?;
        train.files.push(p);
    }
    write_atomic(&opts.out.join(tok.file_name()), |f| {
        f.write_all(tok.file_bytes())
    })?;
    s.train_tokens = train.total;
    s.val_tokens = val.len();
    s.files = train.files;
    s.seconds = t0.elapsed().as_secs_f64();
    Ok(s)
}
