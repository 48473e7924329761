//! Chat examples for training: the tokenized conversations with a validation split, rows of a
//! batch, and a seeded sampler whose state is saved in checkpoints.
//!
//! # One conversation per row, padded
//!
//! Each row of a batch holds one example from its first token, padded on the right: inputs past
//! the example's end are [`PAD_INPUT`] and their targets [`IGNORE_TARGET`]. Attention is causal,
//! so position `i` only sees positions `0..=i`: padding on the right never changes what the
//! example's own positions compute, and no attention mask is needed. Examples are not packed
//! several to a row, because without a block-diagonal attention mask a later conversation would
//! attend to an earlier, unrelated one; one per row is exact and simple, at the cost of the
//! compute spent on padding.
//!
//! An example longer than `seq + 1` tokens is cut to its first `seq + 1` (the statistics count
//! them, and those whose trained tokens all fall past the cut).

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::examples::{ChatEncoder, ChatExample, read_jsonl};
use super::file::{CHAT_FILE_NAME, ChatFile, is_chat_file, read_chat_file};
use crate::error::{Error, Result};
use crate::util::rng::Rng;

/// The target of a position whose loss does not count: masked tokens and padding.
pub use crate::backend::IGNORE_TARGET;
/// The input id of padding positions (any valid id would do: nothing attends to them and their
/// targets are ignored).
pub const PAD_INPUT: u32 = 0;

/// Tokenized conversations split into training and validation examples.
#[derive(Debug, Clone)]
pub struct ChatData {
    path: PathBuf,
    /// `len() + 1` offsets into `ids`.
    offsets: Vec<usize>,
    ids: Vec<u32>,
    train_mask: Vec<bool>,
    /// Indices of the training examples.
    pub train: Vec<usize>,
    /// Indices of the validation examples (every `round(1 / val_fraction)`-th example).
    pub val: Vec<usize>,
    /// How the split was made, for reports.
    pub split: String,
    pub tokenizer_id: String,
    pub template_id: String,
}

/// Counts of a [`ChatData`] for a sequence length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChatStats {
    pub examples: usize,
    pub train_examples: usize,
    pub val_examples: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
    pub longest: usize,
    /// Examples longer than `seq + 1` tokens (cut to `seq + 1`).
    pub truncated: usize,
    /// Of those, examples left with no trained target after the cut.
    pub nothing_left: usize,
}

impl ChatData {
    /// Opens chat data: a `.jsonl` file of conversations (tokenized now, in parallel), or data
    /// prepared by `handgrad prepare --chat` (its folder or its `chat.hgchat`), which must have
    /// been made with the encoder's tokenizer and template.
    pub fn open(path: &Path, encoder: &ChatEncoder, val_fraction: f64) -> Result<Self> {
        let file = if path.is_dir() {
            let f = path.join(CHAT_FILE_NAME);
            if !f.is_file() {
                return Err(Error::data(
                    path,
                    format!(
                        "the folder holds no {CHAT_FILE_NAME} (make it with handgrad prepare --chat)"
                    ),
                ));
            }
            Some(f)
        } else if is_chat_file(path) {
            Some(path.to_path_buf())
        } else {
            None
        };
        if let Some(f) = file {
            let cf = read_chat_file(&f)?;
            let tok = encoder.tokenizer().id();
            if cf.meta.tokenizer_id != tok {
                return Err(Error::data(
                    &f,
                    format!(
                        "prepared with tokenizer {}, but the model's tokenizer is {tok}; prepare the data again with the model's tokenizer",
                        cf.meta.tokenizer_id
                    ),
                ));
            }
            let tpl = encoder.template().id();
            if cf.meta.template_id != tpl {
                return Err(Error::data(
                    &f,
                    format!(
                        "prepared with chat template {}, but this run's template ({}) is {tpl}; prepare the data again with the same template",
                        cf.meta.template_id,
                        encoder.template().origin()
                    ),
                ));
            }
            return Self::from_file(&f, cf, val_fraction);
        }
        if !path.exists() {
            return Err(Error::data(path, "no such file or folder"));
        }
        let examples = encode_jsonl(path, encoder)?;
        Self::from_examples(
            path,
            examples,
            encoder.tokenizer().id(),
            &encoder.template().id(),
            val_fraction,
        )
    }

    /// Chat data from a prepared file's contents.
    pub fn from_file(path: &Path, f: ChatFile, val_fraction: f64) -> Result<Self> {
        let (train, val, split) = split(f.meta.examples, val_fraction, path)?;
        Ok(ChatData {
            path: path.to_path_buf(),
            offsets: f.offsets,
            ids: f.ids,
            train_mask: f.train,
            train,
            val,
            split,
            tokenizer_id: f.meta.tokenizer_id,
            template_id: f.meta.template_id,
        })
    }

    /// Chat data from tokenized examples; `path` names their origin in messages.
    pub fn from_examples(
        path: &Path,
        examples: Vec<ChatExample>,
        tokenizer_id: &str,
        template_id: &str,
        val_fraction: f64,
    ) -> Result<Self> {
        let (train, val, split) = split(examples.len(), val_fraction, path)?;
        let mut offsets = vec![0];
        let mut ids = Vec::new();
        let mut train_mask = Vec::new();
        for e in examples {
            ids.extend_from_slice(&e.ids);
            train_mask.extend_from_slice(&e.train);
            offsets.push(ids.len());
        }
        Ok(ChatData {
            path: path.to_path_buf(),
            offsets,
            ids,
            train_mask,
            train,
            val,
            split,
            tokenizer_id: tokenizer_id.to_string(),
            template_id: template_id.to_string(),
        })
    }

    /// Where the data came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of examples (training and validation).
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ids and trained mask of example `k`.
    pub fn example(&self, k: usize) -> (&[u32], &[bool]) {
        let r = self.offsets[k]..self.offsets[k + 1];
        (&self.ids[r.clone()], &self.train_mask[r])
    }

    /// Every example's ids and mask, concatenated, with the `len() + 1` offsets between them
    /// (for writing a prepared file).
    pub fn parts(&self) -> (&[usize], &[u32], &[bool]) {
        (&self.offsets, &self.ids, &self.train_mask)
    }

    /// Fills one row of a batch with example `example` (module documentation): `inputs[i]` is
    /// token `i` (or [`PAD_INPUT`] past the end), `targets[i]` is token `i + 1` when that token
    /// is trained, else [`IGNORE_TARGET`]. Both slices are `seq` long; the example is cut to its
    /// first `seq + 1` tokens.
    pub fn fill_row(&self, example: usize, seq: usize, inputs: &mut [u32], targets: &mut [u32]) {
        debug_assert_eq!(inputs.len(), seq);
        debug_assert_eq!(targets.len(), seq);
        let (ids, train) = self.example(example);
        let n = ids.len().min(seq + 1);
        for i in 0..seq {
            inputs[i] = if i < n { ids[i] } else { PAD_INPUT };
            targets[i] = if i + 1 < n && train[i + 1] {
                ids[i + 1]
            } else {
                IGNORE_TARGET
            };
        }
    }

    /// Number of trained targets example `k` has in a row of `seq` positions.
    pub fn trained_targets(&self, k: usize, seq: usize) -> usize {
        let (ids, train) = self.example(k);
        let n = ids.len().min(seq + 1);
        train[..n].iter().skip(1).filter(|&&t| t).count()
    }

    /// Counts for rows of `seq` positions.
    pub fn stats(&self, seq: usize) -> ChatStats {
        let mut s = ChatStats {
            examples: self.len(),
            train_examples: self.train.len(),
            val_examples: self.val.len(),
            tokens: self.ids.len(),
            trained_tokens: self.train_mask.iter().filter(|&&t| t).count(),
            ..ChatStats::default()
        };
        for k in 0..self.len() {
            let len = self.offsets[k + 1] - self.offsets[k];
            s.longest = s.longest.max(len);
            if len > seq + 1 {
                s.truncated += 1;
                if self.trained_targets(k, seq) == 0 {
                    s.nothing_left += 1;
                }
            }
        }
        s
    }

    /// Checks every id against the vocabulary (once, at load).
    pub fn validate(&self, vocab: usize) -> Result<()> {
        if let Some((i, &id)) = self
            .ids
            .iter()
            .enumerate()
            .find(|(_, id)| **id as usize >= vocab)
        {
            let k = self.offsets.partition_point(|&o| o <= i) - 1;
            return Err(Error::data(
                &self.path,
                format!(
                    "example {k} holds token id {id}, outside the model's vocabulary of {vocab}"
                ),
            ));
        }
        Ok(())
    }
}

/// Splits `n` examples: every `round(1 / val_fraction)`-th is validation (none for 0).
fn split(n: usize, val_fraction: f64, path: &Path) -> Result<(Vec<usize>, Vec<usize>, String)> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(Error::invalid(format!(
            "--val-fraction must be in [0, 1), got {val_fraction}"
        )));
    }
    let every = if val_fraction > 0.0 {
        (1.0 / val_fraction).round().max(1.0) as usize
    } else {
        0
    };
    let (val, train): (Vec<usize>, Vec<usize>) =
        (0..n).partition(|k| every > 0 && k % every == every - 1);
    if train.is_empty() {
        return Err(Error::data(path, "no training examples"));
    }
    let how = if every > 0 {
        format!("every {every}th example ({} of {n})", val.len())
    } else {
        "none".to_string()
    };
    Ok((train, val, how))
}

/// Reads and tokenizes a JSONL file in parallel; errors name the file and line.
pub fn encode_jsonl(path: &Path, encoder: &ChatEncoder) -> Result<Vec<ChatExample>> {
    read_jsonl(path)?
        .par_iter()
        .map(|(line, conv)| {
            encoder
                .encode(conv)
                .map_err(|e| Error::data(path, format!("line {line}: {e}")))
        })
        .collect()
}

/// The saved state of a [`ChatSampler`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChatSamplerState {
    /// The random stream at the start of the current epoch (its order is drawn from it).
    pub rng: [u64; 4],
    /// Epochs begun (the first is 0).
    pub epoch: u64,
    /// Examples drawn in the current epoch.
    pub position: u64,
    /// Examples drawn so far (the data position).
    pub examples_drawn: u64,
}

/// Draws training examples in epochs, each a fresh seeded permutation of the training examples.
#[derive(Debug, Clone)]
pub struct ChatSampler {
    /// The random stream at the start of the current epoch.
    epoch_rng: [u64; 4],
    /// The stream after drawing this epoch's order (the next epoch starts from it).
    next_rng: [u64; 4],
    examples: Vec<usize>,
    order: Vec<usize>,
    epoch: u64,
    position: u64,
    drawn: u64,
}

impl ChatSampler {
    /// A sampler over the training examples of `data`, seeded.
    pub fn new(data: &ChatData, seed: u64) -> Self {
        let mut s = ChatSampler {
            epoch_rng: Rng::new(seed ^ 0x6A09_E667_F3BC_C908).state(),
            next_rng: [0; 4],
            examples: data.train.clone(),
            order: Vec::new(),
            epoch: 0,
            position: 0,
            drawn: 0,
        };
        s.shuffle();
        s
    }

    /// Draws this epoch's order from `epoch_rng`.
    fn shuffle(&mut self) {
        let mut rng = Rng::from_state(self.epoch_rng);
        self.order = self.examples.clone();
        for i in (1..self.order.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            self.order.swap(i, j);
        }
        self.next_rng = rng.state();
    }

    /// The index (into the data) of the next training example.
    pub fn next_example(&mut self) -> usize {
        if self.position as usize >= self.order.len() {
            self.epoch_rng = self.next_rng;
            self.epoch += 1;
            self.position = 0;
            self.shuffle();
        }
        let k = self.order[self.position as usize];
        self.position += 1;
        self.drawn += 1;
        k
    }

    /// Epochs begun so far (0 during the first).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The state to save in a checkpoint.
    pub fn state(&self) -> ChatSamplerState {
        ChatSamplerState {
            rng: self.epoch_rng,
            epoch: self.epoch,
            position: self.position,
            examples_drawn: self.drawn,
        }
    }

    /// Restores a saved state (of a sampler over the same data).
    pub fn restore(&mut self, s: &ChatSamplerState) {
        self.epoch_rng = s.rng;
        self.epoch = s.epoch;
        self.position = s.position;
        self.drawn = s.examples_drawn;
        self.shuffle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(lens: &[usize], val_fraction: f64) -> ChatData {
        let examples = lens
            .iter()
            .enumerate()
            .map(|(k, &n)| ChatExample {
                ids: (0..n as u32).map(|i| 100 * k as u32 + i).collect(),
                train: (0..n).map(|i| i >= n / 2).collect(),
            })
            .collect();
        ChatData::from_examples(Path::new("t.jsonl"), examples, "tok", "tpl", val_fraction).unwrap()
    }

    #[test]
    fn rows_are_shifted_masked_and_padded() {
        let d = data(&[6], 0.0);
        let (mut x, mut y) = (vec![7; 8], vec![7; 8]);
        d.fill_row(0, 8, &mut x, &mut y);
        // ids 0..6, trained from token 3 on.
        assert_eq!(x, vec![0, 1, 2, 3, 4, 5, PAD_INPUT, PAD_INPUT]);
        let i = IGNORE_TARGET;
        assert_eq!(y, vec![i, i, 3, 4, 5, i, i, i]);
        // Cut to seq + 1 = 4 tokens: inputs 0..3, the last target is token 3.
        let (mut x, mut y) = (vec![7; 3], vec![7; 3]);
        d.fill_row(0, 3, &mut x, &mut y);
        assert_eq!((x, y), (vec![0, 1, 2], vec![i, i, 3]));
        assert_eq!(d.trained_targets(0, 3), 1);
        assert_eq!(d.trained_targets(0, 2), 0);
    }

    #[test]
    fn stats_count_cuts() {
        let d = data(&[6, 3, 10], 0.0);
        let s = d.stats(4);
        assert_eq!((s.examples, s.tokens, s.longest), (3, 19, 10));
        assert_eq!(s.trained_tokens, 3 + 2 + 5);
        // Example 2 (10 tokens, trained from 5) keeps no trained target in 5 tokens.
        assert_eq!((s.truncated, s.nothing_left), (2, 1));
        assert!(d.validate(1000).is_ok());
        let e = d.validate(205).unwrap_err().to_string();
        assert!(e.contains("example 2") && e.contains("205"), "{e}");
    }

    #[test]
    fn split_is_every_kth() {
        let d = data(&[2; 10], 0.25);
        assert_eq!(d.val, vec![3, 7]);
        assert_eq!(d.train.len(), 8);
        assert!(ChatData::from_examples(Path::new("x"), vec![], "t", "t", 0.0).is_err());
        assert!(ChatData::from_examples(Path::new("x"), vec![], "t", "t", 1.0).is_err());
    }

    #[test]
    fn sampler_covers_each_epoch_and_resumes_exactly() {
        let d = data(&[2; 7], 0.0);
        let mut s = ChatSampler::new(&d, 5);
        let mut first: Vec<usize> = (0..7).map(|_| s.next_example()).collect();
        first.sort_unstable();
        assert_eq!(first, (0..7).collect::<Vec<_>>());
        // Save in the middle of the second epoch; a fresh sampler restored from it continues
        // with the same examples.
        for _ in 0..3 {
            s.next_example();
        }
        let state = s.state();
        let json = serde_json::to_string(&state).unwrap();
        let ahead: Vec<usize> = (0..20).map(|_| s.next_example()).collect();
        let mut r = ChatSampler::new(&d, 999);
        r.restore(&serde_json::from_str(&json).unwrap());
        let again: Vec<usize> = (0..20).map(|_| r.next_example()).collect();
        assert_eq!(ahead, again);
        assert_eq!(r.state().examples_drawn, 30);
        // Another seed gives another order.
        let mut o = ChatSampler::new(&d, 6);
        let other: Vec<usize> = (0..7).map(|_| o.next_example()).collect();
        let mut s2 = ChatSampler::new(&d, 5);
        let same: Vec<usize> = (0..7).map(|_| s2.next_example()).collect();
        assert_ne!(other, same);
    }
}
