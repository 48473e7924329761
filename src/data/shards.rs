//! Token shards on disk, read through mmap.
//!
//! Two formats:
//! * **llama2.c**: headerless little-endian `uint16` token ids (the format of llama2.c's
//!   pretokenized TinyStories). Recognised by the absence of the handgrad magic.
//! * **handgrad shard**: a 64-byte header, then little-endian `uint16` or `uint32` ids:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `HGTOKENS` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | bytes per token (2 or 4) |
//! | 16 | 4 | vocabulary size |
//! | 20 | 4 | reserved (0) |
//! | 24 | 8 | number of tokens |
//! | 32 | 32 | tokenizer identity, UTF-8, zero-padded |
//! | 64 | ... | token ids |

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::util::fsutil::write_atomic;

/// Magic bytes of a handgrad token shard.
pub const SHARD_MAGIC: &[u8; 8] = b"HGTOKENS";
const HEADER_LEN: usize = 64;

/// A read-only token file.
pub struct TokenShard {
    path: PathBuf,
    map: Option<Mmap>,
    data_offset: usize,
    width: usize,
    len: usize,
    /// Vocabulary size recorded in the header (handgrad shards only).
    pub vocab_size: Option<usize>,
    /// Tokenizer identity recorded in the header (handgrad shards only).
    pub tokenizer_id: Option<String>,
}

impl std::fmt::Debug for TokenShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenShard")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("width", &self.width)
            .finish()
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// What a file that is not token ids looks like, from its first bytes: `Some("JSON")`,
/// `Some("text")`, or `None` (binary, so possibly token ids). Token ids as uint16 are binary:
/// ids below 256 put zero bytes in every other byte, others control characters, so 64 KB of
/// them are never all printable UTF-8.
pub fn looks_like_text(head: &[u8]) -> Option<&'static str> {
    // Valid UTF-8 up to a character the cut may have split.
    let text = match std::str::from_utf8(head) {
        Ok(t) => t,
        Err(e) if e.error_len().is_none() && e.valid_up_to() + 4 > head.len() => {
            std::str::from_utf8(&head[..e.valid_up_to()]).ok()?
        }
        Err(_) => return None,
    };
    if text.is_empty()
        || text
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t' | '\u{c}'))
    {
        return None;
    }
    match text.trim_start().chars().next() {
        Some('{') | Some('[') => Some("JSON"),
        _ => Some("text"),
    }
}

/// The error for text given where token ids are expected, with the command that makes them.
fn not_token_ids(path: &Path, kind: &str) -> Error {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let out = path.with_file_name(format!("{stem}-tokens"));
    Error::data(
        path,
        format!(
            "this is {kind}, not token ids: tokenize it first with `handgrad prepare {} --tokenizer TOKENIZER --out {}` (the model's tokenizer.json or tokenizer.bin), then train with --data {}",
            path.display(),
            out.display(),
            out.display()
        ),
    )
}

impl TokenShard {
    /// Opens a shard, checking its header and size.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io("opening data file", path, e))?;
        let size = file
            .metadata()
            .map_err(|e| Error::io("reading metadata of", path, e))?
            .len() as usize;
        if size == 0 {
            return Err(Error::data(path, "the file is empty"));
        }
        // SAFETY: read-only private mapping of a file we just opened; token files are not
        // expected to be modified while training reads them.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("mapping", path, e))?;
        let mut shard = TokenShard {
            path: path.to_path_buf(),
            map: None,
            data_offset: 0,
            width: 2,
            len: 0,
            vocab_size: None,
            tokenizer_id: None,
        };
        if size >= 8 && &map[..8] == SHARD_MAGIC {
            if size < HEADER_LEN {
                return Err(Error::data(
                    path,
                    format!("truncated header: {size} bytes, need {HEADER_LEN}"),
                ));
            }
            let version = u32_at(&map, 8);
            if version != 1 {
                return Err(Error::data(
                    path,
                    format!("unsupported shard version {version} (this build reads 1)"),
                ));
            }
            let width = u32_at(&map, 12) as usize;
            if width != 2 && width != 4 {
                return Err(Error::data(
                    path,
                    format!("bad token width {width} (expected 2 or 4 bytes)"),
                ));
            }
            let count = u64::from_le_bytes(map[24..32].try_into().unwrap_or([0; 8])) as usize;
            let expect = count
                .checked_mul(width)
                .and_then(|b| b.checked_add(HEADER_LEN))
                .ok_or_else(|| Error::data(path, "token count in the header overflows"))?;
            if expect != size {
                return Err(Error::data(
                    path,
                    format!(
                        "header says {count} tokens ({expect} bytes) but the file has {size} bytes"
                    ),
                ));
            }
            let id_bytes = &map[32..64];
            let end = id_bytes.iter().position(|&b| b == 0).unwrap_or(32);
            let id = String::from_utf8_lossy(&id_bytes[..end]).into_owned();
            shard.vocab_size = Some(u32_at(&map, 16) as usize);
            shard.tokenizer_id = if id.is_empty() { None } else { Some(id) };
            shard.data_offset = HEADER_LEN;
            shard.width = width;
            shard.len = count;
        } else {
            if let Some(kind) = looks_like_text(&map[..size.min(64 * 1024)]) {
                return Err(not_token_ids(path, kind));
            }
            if !size.is_multiple_of(2) {
                return Err(Error::data(
                    path,
                    format!("{size} bytes is an odd length: not a file of uint16 token ids"),
                ));
            }
            shard.len = size / 2;
        }
        shard.map = Some(map);
        Ok(shard)
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the shard has no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn bytes(&self) -> &[u8] {
        match &self.map {
            Some(m) => &m[self.data_offset..],
            None => &[],
        }
    }

    /// Token `i` (`i < len`).
    #[inline]
    pub fn get(&self, i: usize) -> u32 {
        let b = self.bytes();
        if self.width == 2 {
            u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32
        } else {
            u32_at(b, 4 * i)
        }
    }

    /// Copies `out.len()` tokens starting at `start`.
    pub fn read(&self, start: usize, out: &mut [u32]) {
        for (j, o) in out.iter_mut().enumerate() {
            *o = self.get(start + j);
        }
    }

    /// Checks every id against the vocabulary, naming the first bad position.
    pub fn validate(&self, vocab: usize) -> Result<()> {
        if let Some(v) = self.vocab_size
            && v > vocab
        {
            return Err(Error::data(
                &self.path,
                format!("made for a vocabulary of {v} tokens, but the model has {vocab}"),
            ));
        }
        let bad = (0..self.len).find(|&i| self.get(i) as usize >= vocab);
        if let Some(i) = bad {
            return Err(Error::data(
                &self.path,
                format!(
                    "token id {} at position {i} is outside the vocabulary of {vocab} tokens",
                    self.get(i)
                ),
            ));
        }
        Ok(())
    }

    /// Marks every id that occurs (for vocabulary compaction).
    pub fn mark_present(&self, present: &mut [bool]) {
        for i in 0..self.len {
            if let Some(p) = present.get_mut(self.get(i) as usize) {
                *p = true;
            }
        }
    }
}

/// Writes a handgrad shard atomically: u16 ids when `vocab_size <= 65536`, else u32.
pub fn write_shard(
    path: &Path,
    tokens: &[u32],
    vocab_size: usize,
    tokenizer_id: &str,
) -> Result<()> {
    let width = if vocab_size <= 65536 { 2 } else { 4 };
    let mut buf = Vec::with_capacity(HEADER_LEN + tokens.len() * width);
    buf.extend_from_slice(SHARD_MAGIC);
    buf.extend_from_slice(&1u32.to_le_bytes());
    buf.extend_from_slice(&(width as u32).to_le_bytes());
    buf.extend_from_slice(&(vocab_size as u32).to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
    buf.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    let mut id = [0u8; 32];
    let idb = tokenizer_id.as_bytes();
    id[..idb.len().min(32)].copy_from_slice(&idb[..idb.len().min(32)]);
    buf.extend_from_slice(&id);
    for &t in tokens {
        if width == 2 {
            buf.extend_from_slice(&(t as u16).to_le_bytes());
        } else {
            buf.extend_from_slice(&t.to_le_bytes());
        }
    }
    write_atomic(path, |f| f.write_all(&buf))
}

#[cfg(test)]
mod text_tests {
    use super::*;

    #[test]
    fn text_and_json_are_told_from_token_ids() {
        assert_eq!(
            looks_like_text(b"Once upon a time\nthere was"),
            Some("text")
        );
        assert_eq!(
            looks_like_text("Caf\u{e9} \u{4e2d}".as_bytes()),
            Some("text")
        );
        assert_eq!(looks_like_text(b"  {\"text\": \"hi\"}\n"), Some("JSON"));
        assert_eq!(looks_like_text(b"[{\"story\": 1}]"), Some("JSON"));
        // A UTF-8 character cut at the end of the sniffed bytes.
        let cut = &"ab\u{4e2d}".as_bytes()[..3];
        assert_eq!(looks_like_text(cut), Some("text"));
        // uint16 token ids, small and large.
        let ids: Vec<u8> = [1u16, 450, 29871, 13, 3118, 31999]
            .iter()
            .flat_map(|i| i.to_le_bytes())
            .collect();
        assert_eq!(looks_like_text(&ids), None);
        assert_eq!(looks_like_text(&[]), None);
    }
}
