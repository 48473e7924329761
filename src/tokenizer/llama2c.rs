//! llama2.c's `tokenizer.bin` (the Llama 2 SentencePiece vocabulary with scores), with an
//! encoder that reproduces SentencePiece's BPE: the dummy-prefix space, merges driven by piece
//! score (highest first, leftmost on ties), and `<0xHH>` byte fallback.
//!
//! File layout (little-endian): `i32 max_token_length`, then per token until the end of the
//! file: `f32 score`, `i32 byte length`, the bytes (UTF-8, with SentencePiece's `▁` written as a
//! space). Ids 0, 1, 2 are `<unk>`, BOS and EOS; ids 3..=258 are the byte pieces `<0x00>`..`<0xFF>`.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;

use super::{Tokenizer, fnv1a64};
use crate::error::{Error, Result};

/// A llama2.c / SentencePiece BPE tokenizer.
pub struct Llama2cTokenizer {
    pieces: Vec<Vec<u8>>,
    scores: Vec<f32>,
    /// Piece bytes -> id, for pieces that text can produce (no control or byte pieces).
    lookup: HashMap<Vec<u8>, u32>,
    /// Id of the byte piece `<0xHH>` for each byte, when present.
    byte_ids: [Option<u32>; 256],
    bytes: Vec<u8>,
    id: String,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Id of the single-space piece (the dummy prefix `▁`).
    space: Option<u32>,
}

fn parse_byte_piece(p: &[u8]) -> Option<u8> {
    if p.len() == 6 && p.starts_with(b"<0x") && p[5] == b'>' {
        let hex = std::str::from_utf8(&p[3..5]).ok()?;
        u8::from_str_radix(hex, 16).ok()
    } else {
        None
    }
}

/// A candidate merge in the priority queue: higher score first, then leftmost.
#[derive(PartialEq)]
struct Candidate {
    score: f32,
    left: usize,
    /// Lengths (in bytes) of the two symbols when the candidate was made, to detect staleness.
    left_len: usize,
    right_len: usize,
    id: u32,
}

impl Eq for Candidate {}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Llama2cTokenizer {
    /// Parses `tokenizer.bin` bytes; `origin` names the file in errors. Every record is
    /// bounds-checked: a file cut inside a record is an error naming the token.
    pub fn from_bytes(bytes: Vec<u8>, origin: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Tokenizer(format!("{}: {msg}", origin.display()));
        if bytes.len() < 4 {
            return Err(bad("too short for a llama2.c tokenizer.bin".into()));
        }
        let max_len = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if !(1..=1 << 16).contains(&max_len) {
            return Err(bad(format!(
                "implausible max_token_length {max_len}: not a llama2.c tokenizer.bin"
            )));
        }
        let mut pieces = Vec::new();
        let mut scores = Vec::new();
        let mut at = 4;
        while at < bytes.len() {
            let i = pieces.len();
            let Some(head) = bytes.get(at..at + 8) else {
                return Err(bad(format!(
                    "cut inside the record of token {i} at byte {at}"
                )));
            };
            let score = f32::from_le_bytes([head[0], head[1], head[2], head[3]]);
            let len = i32::from_le_bytes([head[4], head[5], head[6], head[7]]);
            if len < 0 || len > max_len {
                return Err(bad(format!(
                    "token {i} has length {len}, outside 0..={max_len} (max_token_length)"
                )));
            }
            let start = at + 8;
            let Some(piece) = bytes.get(start..start + len as usize) else {
                return Err(bad(format!(
                    "cut inside the bytes of token {i} at byte {start}"
                )));
            };
            pieces.push(piece.to_vec());
            scores.push(score);
            at = start + len as usize;
        }
        if pieces.len() < 3 {
            return Err(bad(format!("only {} tokens", pieces.len())));
        }
        let mut lookup = HashMap::with_capacity(pieces.len());
        let mut byte_ids = [None; 256];
        for (i, p) in pieces.iter().enumerate() {
            if let Some(b) = parse_byte_piece(p) {
                byte_ids[b as usize] = Some(i as u32);
            } else if i > 2 {
                // First occurrence wins, as in a sorted-vocabulary binary search over unique
                // pieces.
                lookup.entry(p.clone()).or_insert(i as u32);
            }
        }
        let space = lookup.get(b" ".as_slice()).copied();
        let id = format!("llama2c-{:016x}", fnv1a64(&bytes));
        Ok(Llama2cTokenizer {
            pieces,
            scores,
            lookup,
            byte_ids,
            bytes,
            id,
            bos: Some(1),
            eos: Some(2),
            space,
        })
    }

    /// Reads a `tokenizer.bin` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io("reading tokenizer", path, e))?;
        Self::from_bytes(bytes, path)
    }

    /// The bytes of a piece.
    pub fn piece(&self, id: u32) -> Option<&[u8]> {
        self.pieces.get(id as usize).map(Vec::as_slice)
    }

    /// The score of a piece.
    pub fn score(&self, id: u32) -> Option<f32> {
        self.scores.get(id as usize).copied()
    }

    /// Initial symbols: the dummy prefix, then one piece per code point, or its bytes.
    fn initial_symbols(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() + 1);
        if let Some(s) = self.space {
            ids.push(s);
        }
        let mut buf = [0u8; 4];
        for ch in text.chars() {
            let enc = ch.encode_utf8(&mut buf).as_bytes();
            match self.lookup.get(enc) {
                Some(&id) => ids.push(id),
                None => {
                    for &b in enc {
                        // Unknown bytes map to <unk> (0) when there is no byte piece.
                        ids.push(self.byte_ids[b as usize].unwrap_or(0));
                    }
                }
            }
        }
        ids
    }

    fn candidate(&self, syms: &[u32], left: usize, right: usize) -> Option<Candidate> {
        let a = &self.pieces[syms[left] as usize];
        let b = &self.pieces[syms[right] as usize];
        let mut joined = Vec::with_capacity(a.len() + b.len());
        joined.extend_from_slice(a);
        joined.extend_from_slice(b);
        self.lookup.get(&joined).map(|&id| Candidate {
            score: self.scores[id as usize],
            left,
            left_len: a.len(),
            right_len: b.len(),
            id,
        })
    }

    /// Encodes with the SentencePiece BPE procedure in O(n log n): symbols in a linked list,
    /// candidate merges in a max-heap by score (leftmost first on ties), stale entries skipped.
    fn bpe(&self, text: &str) -> Vec<u32> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut syms = self.initial_symbols(text);
        let n = syms.len();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        for i in 0..n.saturating_sub(1) {
            if let Some(c) = self.candidate(&syms, i, i + 1) {
                heap.push(c);
            }
        }
        while let Some(c) = heap.pop() {
            let l = c.left;
            let r = next[l];
            if !alive[l] || r >= n {
                continue;
            }
            // Stale if either symbol changed since the candidate was made.
            if self.pieces[syms[l] as usize].len() != c.left_len
                || self.pieces[syms[r] as usize].len() != c.right_len
            {
                continue;
            }
            syms[l] = c.id;
            alive[r] = false;
            next[l] = next[r];
            if next[r] < n {
                prev[next[r]] = l;
            }
            let p = prev[l];
            if p < n
                && let Some(c) = self.candidate(&syms, p, l)
            {
                heap.push(c);
            }
            if next[l] < n
                && let Some(c) = self.candidate(&syms, l, next[l])
            {
                heap.push(c);
            }
        }
        let mut out = Vec::with_capacity(n);
        let mut i = 0;
        while i < n {
            out.push(syms[i]);
            i = next[i];
        }
        out
    }
}

impl Tokenizer for Llama2cTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.bpe(text))
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::new();
        let mut at_start = true;
        for &id in ids {
            if id < 3 {
                // <unk>, BOS, EOS: a new text starts after BOS.
                at_start = at_start || id == 1;
                continue;
            }
            let Some(p) = self.pieces.get(id as usize) else {
                return Err(Error::Tokenizer(format!(
                    "token id {id} is outside the vocabulary of {}",
                    self.pieces.len()
                )));
            };
            if let Some(b) = parse_byte_piece(p) {
                bytes.push(b);
            } else if at_start && p.first() == Some(&b' ') {
                // SentencePiece drops the dummy-prefix space at the start of a text.
                bytes.extend_from_slice(&p[1..]);
            } else {
                bytes.extend_from_slice(p);
            }
            at_start = false;
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn file_bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn file_name(&self) -> &'static str {
        "tokenizer.bin"
    }
}
