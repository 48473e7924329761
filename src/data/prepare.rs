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
    check_options(opts)?;
    create_dir_all(&opts.out)?;
    let (bos, eos) = (tok.bos_id(), tok.eos_id());
    let framing = Framing {
        bos,
        eos,
        add_eos: eos.is_some() && (bos.is_none() || opts.force_eos),
    };
    let mut split = Split {
        val_every: if opts.val_fraction > 0.0 {
            (1.0 / opts.val_fraction).round().max(1.0) as usize
        } else {
            0
        },
        train: ShardWriter {
            dir: &opts.out,
            buf: Vec::new(),
            limit: opts.shard_tokens,
            index: 0,
            vocab: tok.vocab_size(),
            id: tok.id().to_string(),
            files: Vec::new(),
            total: 0,
        },
        val: Vec::new(),
    };
    let mut s = PrepareSummary::default();
    for path in &opts.inputs {
        let (text, len) = read_text(path)?;
        let docs = documents_of(path, &text, &opts.split)?;
        drop(text);
        for batch in docs.chunks(BATCH_DOCS) {
            for ids in encode_batch(tok, batch, &framing)? {
                split.push(&mut s, &ids)?;
            }
        }
        s.bytes += len;
        progress(s.bytes);
    }
    split.finish(tok, &opts.out, &mut s)?;
    s.seconds = t0.elapsed().as_secs_f64();
    Ok(s)
}

/// Rejects options [`prepare`] cannot honour, and an `--out` folder that already holds token
/// files.
fn check_options(opts: &PrepareOptions) -> Result<()> {
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
    Ok(())
}

/// The text of an input file, and its length in bytes.
fn read_text(path: &Path) -> Result<(String, u64)> {
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
    Ok((text, len))
}

/// The special tokens around each document.
struct Framing {
    bos: Option<u32>,
    eos: Option<u32>,
    /// Whether EOS goes after each document.
    add_eos: bool,
}

/// Tokenizes a batch of documents in parallel, each framed by BOS/EOS.
fn encode_batch(tok: &dyn Tokenizer, batch: &[String], f: &Framing) -> Result<Vec<Vec<u32>>> {
    batch
        .par_iter()
        .map(|d| {
            let mut ids = Vec::with_capacity(d.len() / 3 + 2);
            if let Some(b) = f.bos {
                ids.push(b);
            }
            ids.extend(tok.encode(d)?);
            if f.add_eos
                && let Some(e) = f.eos
            {
                ids.push(e);
            }
            Ok(ids)
        })
        .collect::<Result<_>>()
}

/// Where tokenized documents go: every `val_every`-th to validation (none when 0), the rest
/// to the training shards.
struct Split<'a> {
    val_every: usize,
    train: ShardWriter<'a>,
    val: Vec<u32>,
}

impl Split<'_> {
    /// Adds the next document, counting it in `s`.
    fn push(&mut self, s: &mut PrepareSummary, ids: &[u32]) -> Result<()> {
        let i = s.documents;
        s.documents += 1;
        if self.val_every > 0 && i % self.val_every == self.val_every - 1 {
            s.val_documents += 1;
            self.val.extend_from_slice(ids);
        } else {
            self.train.push(ids)?;
        }
        Ok(())
    }

    /// Writes the last training shard, the validation shard and the tokenizer file into
    /// `out`, and fills in the token counts and files of `s`.
    fn finish(mut self, tok: &dyn Tokenizer, out: &Path, s: &mut PrepareSummary) -> Result<()> {
        self.train.flush()?;
        if s.documents == 0 {
            return Err(Error::invalid("the inputs hold no documents"));
        }
        if !self.val.is_empty() {
            let p = out.join("val.bin");
            write_shard(&p, &self.val, tok.vocab_size(), tok.id())?;
            self.train.files.push(p);
        }
        write_atomic(&out.join(tok.file_name()), |f| {
            f.write_all(tok.file_bytes())
        })?;
        s.train_tokens = self.train.total;
        s.val_tokens = self.val.len();
        s.files = self.train.files;
        Ok(())
    }
}
