//! Tokenizers behind one interface: Hugging Face `tokenizer.json` files (through the
//! `tokenizers` crate, including the byte-level BPE tokenizers that handgrad trains itself) and
//! llama2.c's `tokenizer.bin` (SentencePiece-compatible encoder of our own).

pub mod bpe_train;
pub mod hf;
pub mod llama2c;

use std::path::Path;

use crate::error::{Error, Result};

pub use hf::HfTokenizer;
pub use llama2c::Llama2cTokenizer;

/// Token ids and, for each, the byte range `[start, end)` of the text it comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenSpans {
    pub ids: Vec<u32>,
    pub spans: Vec<(usize, usize)>,
}

/// What the trainer, data preparation and generation need from a tokenizer.
pub trait Tokenizer: Send + Sync {
    /// Token ids of a text (no BOS/EOS added).
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Token ids of a text (no BOS/EOS added, the same ids as [`Tokenizer::encode`]) with the
    /// byte range of `text` that each token comes from; `None` when the tokenizer cannot tell
    /// (chat data needs it to tell the assistant's tokens from the rest).
    fn encode_with_offsets(&self, text: &str) -> Result<Option<TokenSpans>> {
        let _ = text;
        Ok(None)
    }
    /// The text of a sequence of ids (special tokens skipped).
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// Number of ids, special tokens included.
    fn vocab_size(&self) -> usize;
    /// Beginning-of-sequence id, if the tokenizer has one.
    fn bos_id(&self) -> Option<u32>;
    /// End-of-sequence id, if the tokenizer has one.
    fn eos_id(&self) -> Option<u32>;
    /// A short identity string (kind and content hash) stored in data shards and checkpoints,
    /// so that data and models made with different tokenizers are never mixed up.
    fn id(&self) -> &str;
    /// The file this tokenizer was loaded from, as bytes, for copying into a run directory.
    fn file_bytes(&self) -> &[u8];
    /// The file name to use when copying it (`tokenizer.json`, `tokenizer.bin`).
    fn file_name(&self) -> &'static str;
    /// Ids that end generation (the EOS id, plus chat end markers where the tokenizer has them).
    fn stop_ids(&self) -> Vec<u32> {
        self.eos_id().into_iter().collect()
    }
}

/// 64-bit FNV-1a, used for tokenizer identities.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The tokenizer file inside a folder (`tokenizer.json` or `tokenizer.bin`), if any.
pub fn find_in_dir(dir: &Path) -> Option<std::path::PathBuf> {
    ["tokenizer.json", "tokenizer.bin"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

/// Loads a tokenizer file: a Hugging Face `tokenizer.json`, a llama2.c `tokenizer.bin`, or a
/// folder holding one of them.
pub fn load(path: &Path) -> Result<Box<dyn Tokenizer>> {
    let path = if path.is_dir() {
        find_in_dir(path).ok_or_else(|| {
            Error::Tokenizer(format!(
                "{}: no tokenizer.json or tokenizer.bin in this folder",
                path.display()
            ))
        })?
    } else {
        path.to_path_buf()
    };
    let bytes = std::fs::read(&path).map_err(|e| Error::io("reading tokenizer", &path, e))?;
    from_bytes(bytes, &path)
}

/// Loads a tokenizer from file bytes (format detected from the content); `name` names the
/// origin in messages.
pub fn from_bytes(bytes: Vec<u8>, name: &Path) -> Result<Box<dyn Tokenizer>> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied();
    if first == Some(b'{') {
        Ok(Box::new(HfTokenizer::from_bytes(bytes, name)?))
    } else {
        Ok(Box::new(Llama2cTokenizer::from_bytes(bytes, name)?))
    }
}
