//! The prepared chat data file, `chat.hgchat`: tokenized conversations with their trained-token
//! mask, written once by `handgrad prepare --chat` and read whole at the start of a run.
//!
//! All numbers little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `HGCHATEX` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | `M`, length of the metadata |
//! | 16 | `M` | metadata, UTF-8 JSON ([`ChatFileMeta`]: tokenizer and template identities, the template's text and special-token strings, counts) |
//! | 16 + `M` | 8 × (`E` + 1) | `u64` token offsets: example `k` is tokens `[off[k], off[k+1])`; `off[0] = 0`, `off[E] = T` |
//! | ... | 4 × `T` | `u32` token ids |
//! | ... | ⌈`T` / 8⌉ | trained mask, token `i` in bit `i % 8` (least significant first) of byte `i / 8` |
//! | ... | 4 | CRC-32 (IEEE) of every byte before it |
//! | ... | 8 | end marker `HGCHATND` |
//!
//! `E` and `T` are the metadata's `examples` and `tokens`; a file whose length is not exactly
//! what they imply, whose checksum differs, or whose offsets are not increasing is refused.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::util::fsutil::write_atomic;

/// Magic bytes of a prepared chat file.
pub const CHAT_MAGIC: &[u8; 8] = b"HGCHATEX";
/// End marker of a prepared chat file.
const END_MARKER: &[u8; 8] = b"HGCHATND";
/// The format version this code writes and reads.
pub const CHAT_FORMAT_VERSION: u32 = 1;
/// Name of the file inside a prepared folder.
pub const CHAT_FILE_NAME: &str = "chat.hgchat";

/// The metadata of a prepared chat file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatFileMeta {
    /// Identity of the tokenizer that made the ids (`Tokenizer::id`).
    pub tokenizer_id: String,
    pub vocab_size: usize,
    /// Identity of the template (`ChatTemplate::id`).
    pub template_id: String,
    /// The template's text and special-token strings, so generation can use the same.
    pub template_source: String,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub examples: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
    /// The JSONL files the examples came from, in order.
    pub sources: Vec<String>,
}

/// The contents of a prepared chat file.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatFile {
    pub meta: ChatFileMeta,
    /// `examples + 1` offsets into `ids`.
    pub offsets: Vec<usize>,
    pub ids: Vec<u32>,
    pub train: Vec<bool>,
}

/// Writes a prepared chat file atomically. `meta`'s counts must match the arrays.
pub fn write_chat_file(path: &Path, f: &ChatFile) -> Result<()> {
    let n = f.ids.len();
    if f.train.len() != n
        || f.offsets.len() != f.meta.examples + 1
        || f.meta.tokens != n
        || f.offsets.last() != Some(&n)
    {
        return Err(Error::invalid(format!(
            "{}: inconsistent chat data (internal error)",
            path.display()
        )));
    }
    let meta = serde_json::to_vec(&f.meta)
        .map_err(|e| Error::json(format!("writing {}", path.display()), e))?;
    let mut bytes = Vec::with_capacity(16 + meta.len() + 8 * f.offsets.len() + 5 * n + 12);
    bytes.extend_from_slice(CHAT_MAGIC);
    bytes.extend_from_slice(&CHAT_FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&meta);
    for &o in &f.offsets {
        bytes.extend_from_slice(&(o as u64).to_le_bytes());
    }
    for &id in &f.ids {
        bytes.extend_from_slice(&id.to_le_bytes());
    }
    let mut mask = vec![0u8; n.div_ceil(8)];
    for (i, _) in f.train.iter().enumerate().filter(|(_, t)| **t) {
        mask[i / 8] |= 1 << (i % 8);
    }
    bytes.extend_from_slice(&mask);
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes.extend_from_slice(END_MARKER);
    write_atomic(path, |w| w.write_all(&bytes))
}

/// Whether a file starts with the chat magic.
pub fn is_chat_file(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head == CHAT_MAGIC
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Reads and checks a prepared chat file.
pub fn read_chat_file(path: &Path) -> Result<ChatFile> {
    let b = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    parse_chat_file(&b).map_err(|m| Error::format(path, m))
}

/// Parses the bytes of a chat file; the error says what is wrong.
pub fn parse_chat_file(b: &[u8]) -> std::result::Result<ChatFile, String> {
    if b.len() < 16 || &b[..8] != CHAT_MAGIC {
        return Err("not a handgrad chat data file (no HGCHATEX magic)".to_string());
    }
    let version = u32_at(b, 8);
    if version != CHAT_FORMAT_VERSION {
        return Err(format!(
            "chat data format version {version}; this handgrad reads version {CHAT_FORMAT_VERSION} (prepare the data again)"
        ));
    }
    let m = u32_at(b, 12) as usize;
    let meta_end = 16usize
        .checked_add(m)
        .filter(|&e| e <= b.len())
        .ok_or("truncated: the metadata runs past the end of the file")?;
    let meta: ChatFileMeta = serde_json::from_slice(&b[16..meta_end])
        .map_err(|e| format!("unreadable metadata: {e}"))?;
    let (e, t) = (meta.examples as u128, meta.tokens as u128);
    let expected = meta_end as u128 + 8 * (e + 1) + 4 * t + t.div_ceil(8) + 12;
    if expected != b.len() as u128 {
        return Err(format!(
            "{} bytes where {} examples and {} tokens need {expected} (truncated or corrupt)",
            b.len(),
            meta.examples,
            meta.tokens
        ));
    }
    let body_end = b.len() - 12;
    if &b[b.len() - 8..] != END_MARKER {
        return Err("no end marker (truncated or corrupt)".to_string());
    }
    let crc = u32_at(b, body_end);
    if crc32fast::hash(&b[..body_end]) != crc {
        return Err("checksum mismatch (corrupt file)".to_string());
    }
    let (e, t) = (meta.examples, meta.tokens);
    let mut at = meta_end;
    let mut offsets = Vec::with_capacity(e + 1);
    for k in 0..=e {
        let o = u64_at(b, at + 8 * k);
        let prev = offsets.last().copied().unwrap_or(0);
        if (k == 0 && o != 0) || (o as u128) < prev as u128 || o as u128 > t as u128 {
            return Err(format!("example offsets are not increasing at example {k}"));
        }
        offsets.push(o as usize);
    }
    if offsets.last() != Some(&t) {
        return Err("the last example offset is not the token count".to_string());
    }
    at += 8 * (e + 1);
    let ids: Vec<u32> = (0..t).map(|i| u32_at(b, at + 4 * i)).collect();
    at += 4 * t;
    let train: Vec<bool> = (0..t).map(|i| b[at + i / 8] >> (i % 8) & 1 == 1).collect();
    let trained = train.iter().filter(|&&x| x).count();
    if trained != meta.trained_tokens {
        return Err(format!(
            "the mask holds {trained} trained tokens, the metadata says {}",
            meta.trained_tokens
        ));
    }
    Ok(ChatFile {
        meta,
        offsets,
        ids,
        train,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ChatFile {
        ChatFile {
            meta: ChatFileMeta {
                tokenizer_id: "hf-1".into(),
                vocab_size: 100,
                template_id: "jinja-2".into(),
                template_source: "{{ x }}".into(),
                bos_token: None,
                eos_token: Some("</s>".into()),
                examples: 2,
                tokens: 11,
                trained_tokens: 4,
                sources: vec!["a.jsonl".into()],
            },
            offsets: vec![0, 9, 11],
            ids: (0..11).collect(),
            train: vec![
                false, false, true, true, false, false, false, false, true, false, true,
            ],
        }
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(CHAT_FILE_NAME);
        let f = sample();
        write_chat_file(&p, &f).unwrap();
        assert!(is_chat_file(&p));
        assert_eq!(read_chat_file(&p).unwrap(), f);
        let good = std::fs::read(&p).unwrap();
        // Every truncation and every flipped byte is refused, never a panic.
        for cut in 0..good.len() {
            assert!(parse_chat_file(&good[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            assert!(parse_chat_file(&bad).is_err(), "flip at {i}");
        }
        let mut v2 = good.clone();
        v2[8] = 2;
        assert!(parse_chat_file(&v2).unwrap_err().contains("version 2"));
    }
}
