//! Training and validation token streams, random training windows from a seeded sampler, and
//! a fixed set of validation windows.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::shards::TokenShard;
use crate::error::{Error, Result};
use crate::util::rng::Rng;

/// A contiguous range of tokens inside one shard.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub shard: usize,
    pub start: usize,
    pub len: usize,
}

/// Shards split into training and validation spans.
#[derive(Debug)]
pub struct Dataset {
    pub shards: Vec<TokenShard>,
    pub train: Vec<Span>,
    pub val: Vec<Span>,
    /// How the validation split was made, for reports.
    pub split: String,
    /// Tokenizer identity recorded in the shards, if any.
    pub tokenizer_id: Option<String>,
}

fn list_data_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io("listing", dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "bin"))
        // A llama2.c tokenizer.bin kept beside the shards is not data.
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("tokenizer"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::data(dir, "the folder holds no .bin token files"));
    }
    Ok(files)
}

fn is_val_name(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.contains("val"))
}

impl Dataset {
    /// Opens a token file or a folder of them and splits off validation data:
    /// * separate train/val files (`train`, `val` paths),
    /// * a folder: files whose name contains `val` are validation, else the last file is
    ///   (split "by shard"); with a single file, the last `val_fraction` of it,
    /// * one file: its last `val_fraction` of tokens (split "by fraction").
    pub fn open(path: &Path, val_fraction: f64) -> Result<Self> {
        if !path.exists() {
            return Err(Error::data(path, "no such file or folder"));
        }
        let files = if path.is_dir() {
            list_data_files(path)?
        } else {
            vec![path.to_path_buf()]
        };
        let (val_files, train_files): (Vec<PathBuf>, Vec<PathBuf>) = files
            .iter()
            .cloned()
            .partition(|p| files.len() > 1 && is_val_name(p));
        let (train_files, val_files) = if val_files.is_empty() && train_files.len() > 1 {
            let mut t = train_files;
            let v = t.pop().into_iter().collect();
            (t, v)
        } else {
            (train_files, val_files)
        };
        if train_files.is_empty() {
            return Err(Error::data(
                path,
                "no training files (every file looks like validation data)",
            ));
        }
        Self::from_files(&train_files, &val_files, val_fraction)
    }

    /// Builds a dataset from explicit training and validation files. With no validation file,
    /// the last `val_fraction` of each training file is held out.
    pub fn from_files(train: &[PathBuf], val: &[PathBuf], val_fraction: f64) -> Result<Self> {
        let mut shards = Vec::new();
        let mut train_spans = Vec::new();
        let mut val_spans = Vec::new();
        let split = if val.is_empty() {
            if !(0.0..1.0).contains(&val_fraction) {
                return Err(Error::invalid(format!(
                    "--val-fraction must be in [0, 1), got {val_fraction}"
                )));
            }
            for p in train {
                let s = TokenShard::open(p)?;
                let n_val = (s.len() as f64 * val_fraction).round() as usize;
                let idx = shards.len();
                train_spans.push(Span {
                    shard: idx,
                    start: 0,
                    len: s.len() - n_val,
                });
                if n_val > 0 {
                    val_spans.push(Span {
                        shard: idx,
                        start: s.len() - n_val,
                        len: n_val,
                    });
                }
                shards.push(s);
            }
            format!(
                "by fraction: last {:.1}% of the tokens",
                val_fraction * 100.0
            )
        } else {
            for p in train {
                let s = TokenShard::open(p)?;
                train_spans.push(Span {
                    shard: shards.len(),
                    start: 0,
                    len: s.len(),
                });
                shards.push(s);
            }
            for p in val {
                let s = TokenShard::open(p)?;
                val_spans.push(Span {
                    shard: shards.len(),
                    start: 0,
                    len: s.len(),
                });
                shards.push(s);
            }
            format!(
                "by shard: {} validation file(s) ({})",
                val.len(),
                val.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let ids: Vec<&String> = shards
            .iter()
            .filter_map(|s| s.tokenizer_id.as_ref())
            .collect();
        if let Some(first) = ids.first()
            && let Some(other) = ids.iter().find(|i| *i != first)
        {
            return Err(Error::invalid(format!(
                "data files were made with different tokenizers ({first} and {other})"
            )));
        }
        Ok(Dataset {
            tokenizer_id: ids.first().map(|s| s.to_string()),
            shards,
            train: train_spans,
            val: val_spans,
            split,
        })
    }

    /// Checks every token id against the vocabulary (once, at load) and that there is enough
    /// data for windows of `seq + 1` tokens.
    pub fn validate(&self, vocab: usize, seq: usize) -> Result<()> {
        for s in &self.shards {
            s.validate(vocab)?;
        }
        let need = seq + 1;
        let longest_train = self.train.iter().map(|s| s.len).max().unwrap_or(0);
        if longest_train < need {
            let p = self
                .train
                .first()
                .map(|s| self.shards[s.shard].path().to_path_buf())
                .unwrap_or_default();
            return Err(Error::data(
                p,
                format!(
                    "only {longest_train} training tokens in the longest file, fewer than seq + 1 = {need}; use a shorter --seq or more data"
                ),
            ));
        }
        if !self.val.is_empty() && self.val.iter().all(|s| s.len < need) {
            let p = self.shards[self.val[0].shard].path().to_path_buf();
            return Err(Error::data(
                p,
                format!(
                    "validation data is shorter than seq + 1 = {need} tokens; use a shorter --seq or more data"
                ),
            ));
        }
        Ok(())
    }

    /// Total training tokens.
    pub fn train_tokens(&self) -> usize {
        self.train.iter().map(|s| s.len).sum()
    }

    /// Total validation tokens.
    pub fn val_tokens(&self) -> usize {
        self.val.iter().map(|s| s.len).sum()
    }

    /// Marks every id that occurs in training or validation data.
    pub fn mark_present(&self, present: &mut [bool]) {
        for s in &self.shards {
            s.mark_present(present);
        }
    }

    /// Reads `out.len()` tokens of `span` from `offset`.
    fn read(&self, span: &Span, offset: usize, out: &mut [u32]) {
        self.shards[span.shard].read(span.start + offset, out);
    }

    /// Fixed validation windows: `count` windows of `seq + 1` tokens evenly spread over the
    /// validation spans (the same windows at every evaluation, so losses are comparable).
    pub fn val_windows(&self, count: usize, seq: usize) -> Vec<Vec<u32>> {
        let usable: Vec<&Span> = self.val.iter().filter(|s| s.len > seq).collect();
        if usable.is_empty() || count == 0 {
            return Vec::new();
        }
        let total: usize = usable.iter().map(|s| s.len - seq).sum();
        (0..count)
            .map(|i| {
                let mut pos = (i as u128 * total as u128 / count as u128) as usize;
                let mut w = vec![0u32; seq + 1];
                for s in &usable {
                    let n = s.len - seq;
                    if pos < n {
                        self.read(s, pos, &mut w);
                        break;
                    }
                    pos -= n;
                }
                w
            })
            .collect()
    }
}

/// The saved state of a [`WindowSampler`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SamplerState {
    pub rng: [u64; 4],
    /// Windows drawn so far (the data position).
    pub windows_drawn: u64,
}

/// Draws random training windows of `seq + 1` tokens, uniformly over all valid start positions.
#[derive(Debug, Clone)]
pub struct WindowSampler {
    rng: Rng,
    seq: usize,
    /// Cumulative number of valid starts per training span.
    cumulative: Vec<(usize, u64)>,
    total: u64,
    windows_drawn: u64,
}

impl WindowSampler {
    /// A sampler over the training spans of `data`, seeded.
    pub fn new(data: &Dataset, seq: usize, seed: u64) -> Self {
        let mut cumulative = Vec::new();
        let mut total = 0u64;
        for (i, s) in data.train.iter().enumerate() {
            if s.len > seq {
                total += (s.len - seq) as u64;
                cumulative.push((i, total));
            }
        }
        WindowSampler {
            rng: Rng::new(seed ^ 0xD1B5_4A32_D192_ED03),
            seq,
            cumulative,
            total,
            windows_drawn: 0,
        }
    }

    /// Fills `out` (`seq + 1` tokens) with the next random window.
    pub fn next_window(&mut self, data: &Dataset, out: &mut [u32]) {
        debug_assert_eq!(out.len(), self.seq + 1);
        let r = self.rng.below(self.total.max(1));
        let k = self.cumulative.partition_point(|&(_, c)| c <= r);
        let (span_idx, end) = self.cumulative[k.min(self.cumulative.len() - 1)];
        let span = &data.train[span_idx];
        let begin = end - (span.len - self.seq) as u64;
        data.read(span, (r - begin) as usize, out);
        self.windows_drawn += 1;
    }

    /// Draws the next window without reading it (another data-parallel rank trains on it).
    pub fn skip_window(&mut self) {
        self.rng.below(self.total.max(1));
        self.windows_drawn += 1;
    }

    /// The state to save in a checkpoint.
    pub fn state(&self) -> SamplerState {
        SamplerState {
            rng: self.rng.state(),
            windows_drawn: self.windows_drawn,
        }
    }

    /// Restores a saved state.
    pub fn restore(&mut self, s: &SamplerState) {
        self.rng = Rng::from_state(s.rng);
        self.windows_drawn = s.windows_drawn;
    }
}
