//! The built-in dataset: stories from [`super::stories`], a byte-level BPE tokenizer trained on
//! them by [`crate::tokenizer::bpe_train`], and token shards. Built on first use into a cache
//! folder (`$HANDGRAD_CACHE`, else `$XDG_CACHE_HOME/handgrad`, else `~/.cache/handgrad`) and
//! reused afterwards.

use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::shards::write_shard;
use super::stories::story;
use crate::error::{Error, Result};
use crate::tokenizer;
use crate::tokenizer::bpe_train::{BpeOptions, BpeTrainer};
use crate::util::fsutil::{create_dir_all, unique_suffix, write_atomic};

/// Version of the built-in data; bump when the generator or tokenizer recipe changes.
pub const VERSION: &str = "v1";
/// Seed of the story generator.
pub const SEED: u64 = 2026;
/// Stories in the training shard.
pub const TRAIN_STORIES: u64 = 40_000;
/// Stories in the validation shard (generated with indices after the training ones).
pub const VAL_STORIES: u64 = 1_000;
/// Stories the tokenizer is trained on.
pub const TOKENIZER_STORIES: u64 = 10_000;
/// Vocabulary size of the built-in tokenizer (256 bytes + merges + `<|endoftext|>`).
pub const VOCAB_SIZE: usize = 1024;

/// Files of the built-in dataset.
#[derive(Debug, Clone)]
pub struct BuiltinData {
    pub dir: PathBuf,
    pub tokenizer: PathBuf,
    pub train: PathBuf,
    pub val: PathBuf,
}

/// The cache root folder.
pub fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("HANDGRAD_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("handgrad");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".cache").join("handgrad");
    }
    PathBuf::from(".handgrad-cache")
}

impl BuiltinData {
    /// The dataset: its own train and validation files.
    pub fn dataset(&self) -> Result<crate::data::Dataset> {
        crate::data::Dataset::from_files(
            std::slice::from_ref(&self.train),
            std::slice::from_ref(&self.val),
            0.0,
        )
    }
}

fn paths(dir: PathBuf) -> BuiltinData {
    BuiltinData {
        tokenizer: dir.join("tokenizer.json"),
        train: dir.join("train.bin"),
        val: dir.join("val.bin"),
        dir,
    }
}

/// Returns the built-in dataset, building it under `root` if it is not there yet.
/// `log` receives one line per stage.
pub fn ensure(root: &Path, log: &mut dyn FnMut(&str)) -> Result<BuiltinData> {
    let dir = root.join(format!("builtin-{VERSION}"));
    let data = paths(dir.clone());
    if dir.join("COMPLETE").exists() {
        return Ok(data);
    }
    log(&format!(
        "building the built-in dataset in {} (first use only)",
        dir.display()
    ));
    create_dir_all(root)?;
    // Build in a private folder, then rename it into place, so that a crash or a concurrent
    // build never leaves a half-written dataset behind.
    let staging = root.join(format!("builtin-{VERSION}.building-{}", unique_suffix()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| Error::io("removing", &staging, e))?;
    }
    create_dir_all(&staging)?;
    build_into(&staging, log)?;
    match std::fs::rename(&staging, &dir) {
        Ok(()) => {}
        Err(_) if dir.join("COMPLETE").exists() => {
            // Another process finished first; use its copy.
            let _ = std::fs::remove_dir_all(&staging);
        }
        Err(e) => return Err(Error::io("moving into place", &dir, e)),
    }
    Ok(data)
}

fn build_into(dir: &Path, log: &mut dyn FnMut(&str)) -> Result<()> {
    let t0 = std::time::Instant::now();
    log(&format!(
        "  generating {} stories",
        TRAIN_STORIES + VAL_STORIES
    ));
    let stories: Vec<String> = (0..TRAIN_STORIES + VAL_STORIES)
        .into_par_iter()
        .map(|i| story(SEED, i))
        .collect();

    log(&format!(
        "  training a byte-level BPE tokenizer (vocab {VOCAB_SIZE}) on {TOKENIZER_STORIES} stories"
    ));
    let mut trainer = BpeTrainer::new();
    for s in &stories[..TOKENIZER_STORIES as usize] {
        trainer.feed(s)?;
    }
    let doc = trainer.train(&BpeOptions {
        vocab_size: VOCAB_SIZE,
        ..Default::default()
    })?;
    let tok_bytes =
        serde_json::to_vec_pretty(&doc).map_err(|e| Error::json("writing tokenizer.json", e))?;
    let tok_path = dir.join("tokenizer.json");
    write_atomic(&tok_path, |f| f.write_all(&tok_bytes))?;
    let tok = tokenizer::load(&tok_path)?;
    let eos = tok
        .eos_id()
        .ok_or_else(|| Error::Tokenizer("built-in tokenizer has no end-of-text token".into()))?;

    log("  tokenizing");
    let encoded: Vec<Vec<u32>> = stories
        .par_iter()
        .map(|s| {
            tok.encode(s).map(|mut ids| {
                ids.push(eos);
                ids
            })
        })
        .collect::<Result<_>>()?;
    let (train, val) = encoded.split_at(TRAIN_STORIES as usize);
    let train: Vec<u32> = train.concat();
    let val: Vec<u32> = val.concat();
    write_shard(&dir.join("train.bin"), &train, tok.vocab_size(), tok.id())?;
    write_shard(&dir.join("val.bin"), &val, tok.vocab_size(), tok.id())?;

    let sample: String = stories[..5].join("\n\n<|endoftext|>\n\n");
    write_atomic(&dir.join("sample.txt"), |f| f.write_all(sample.as_bytes()))?;
    let readme = format!(
        "handgrad built-in dataset {VERSION}\n\n\
         Synthetic children's stories from handgrad's own story generator (src/data/stories.rs),\n\
         seed {SEED}. This is NOT TinyStories. Stories 0..{TRAIN_STORIES} form train.bin, the next\n\
         {VAL_STORIES} form val.bin; each story is followed by <|endoftext|>.\n\
         Tokenizer: byte-level BPE with {VOCAB_SIZE} ids trained by handgrad on the first\n\
         {TOKENIZER_STORIES} stories. train.bin: {} tokens, val.bin: {} tokens.\n",
        train.len(),
        val.len()
    );
    write_atomic(&dir.join("README.txt"), |f| f.write_all(readme.as_bytes()))?;
    write_atomic(&dir.join("COMPLETE"), |f| f.write_all(b"ok\n"))?;
    log(&format!(
        "  done in {:.1}s: {} training tokens, {} validation tokens",
        t0.elapsed().as_secs_f64(),
        train.len(),
        val.len()
    ));
    Ok(())
}
