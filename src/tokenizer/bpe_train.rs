//! Byte-level BPE training (our own implementation), written out as a Hugging Face
//! `tokenizer.json` that the `tokenizers` library (Rust or Python) loads and encodes with.
//!
//! Pipeline of the produced tokenizer: no normalizer; GPT-2 `ByteLevel` pre-tokenizer (GPT-2
//! regex split, bytes mapped to printable characters, no prefix space); BPE model with the 256
//! byte symbols as ids `0..256` (in byte order), then one id per learned merge, then the special
//! tokens; `ByteLevel` decoder.
//!
//! Training counts the pre-tokenized words of the input, then repeatedly merges the most
//! frequent adjacent pair of symbols (ties broken by the smaller pair of ids, so the result is
//! deterministic), keeping pair counts up to date incrementally.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use serde_json::{Map, Value, json};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

use crate::error::{Error, Result};

/// The special token handgrad's own tokenizers use between documents.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Options of [`BpeTrainer`].
#[derive(Debug, Clone)]
pub struct BpeOptions {
    /// Final vocabulary size: 256 byte symbols + merges + special tokens.
    pub vocab_size: usize,
    /// Special tokens, appended after the merges.
    pub special_tokens: Vec<String>,
    /// Pairs seen fewer times than this are never merged.
    pub min_frequency: u64,
}

impl Default for BpeOptions {
    fn default() -> Self {
        BpeOptions {
            vocab_size: 1024,
            special_tokens: vec![END_OF_TEXT.to_string()],
            min_frequency: 2,
        }
    }
}

/// GPT-2's reversible byte -> printable character map.
pub fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0u32;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        map[b as usize] = char::from_u32(c).unwrap_or('?');
    }
    map
}

/// Accumulates word counts from texts, then learns merges.
#[derive(Debug, Default)]
pub struct BpeTrainer {
    words: HashMap<String, u64>,
    pre: Option<ByteLevel>,
}

impl BpeTrainer {
    /// An empty trainer.
    pub fn new() -> Self {
        BpeTrainer {
            words: HashMap::new(),
            pre: Some(ByteLevel::new(false, true, true)),
        }
    }

    /// Adds the words of a text (pre-tokenized exactly as the final tokenizer will).
    pub fn feed(&mut self, text: &str) -> Result<()> {
        let pre = self
            .pre
            .get_or_insert_with(|| ByteLevel::new(false, true, true));
        let mut s = PreTokenizedString::from(text);
        pre.pre_tokenize(&mut s)
            .map_err(|e| Error::Tokenizer(format!("pre-tokenization failed: {e}")))?;
        for (word, _, _) in s.get_splits(OffsetReferential::Original, OffsetType::None) {
            *self.words.entry(word.to_string()).or_insert(0) += 1;
        }
        Ok(())
    }

    /// Number of distinct pre-tokenized words seen.
    pub fn distinct_words(&self) -> usize {
        self.words.len()
    }

    /// Learns the merges and returns the `tokenizer.json` document.
    pub fn train(&self, opts: &BpeOptions) -> Result<Value> {
        let n_special = opts.special_tokens.len();
        if opts.vocab_size < 256 + n_special {
            return Err(Error::invalid(format!(
                "vocab size {} is too small: byte-level BPE needs 256 byte symbols plus {n_special} special token(s)",
                opts.vocab_size
            )));
        }
        let b2c = byte_to_char();
        let mut symbol_text: Vec<String> = b2c.iter().map(|c| c.to_string()).collect();
        let (words, counts) = self.symbol_words(&b2c)?;
        let mut state = MergeState::new(words, counts);

        let target_merges = opts.vocab_size - 256 - n_special;
        let mut merges: Vec<(u32, u32)> = Vec::with_capacity(target_merges);
        while merges.len() < target_merges {
            let Some(pair) = state.next_pair(opts.min_frequency) else {
                break;
            };
            let new_id = symbol_text.len() as u32;
            symbol_text.push(format!(
                "{}{}",
                symbol_text[pair.0 as usize], symbol_text[pair.1 as usize]
            ));
            merges.push(pair);
            state.merge(pair, new_id);
        }

        Ok(tokenizer_json(&symbol_text, &merges, &opts.special_tokens))
    }

    /// The words as sequences of byte symbol ids, with their counts, in a fixed (sorted) order
    /// for determinism.
    fn symbol_words(&self, b2c: &[char; 256]) -> Result<(Vec<Vec<u32>>, Vec<u64>)> {
        let char_id: HashMap<char, u32> = b2c
            .iter()
            .enumerate()
            .map(|(i, &c)| (c, i as u32))
            .collect();
        let mut sorted: Vec<(&String, &u64)> = self.words.iter().collect();
        sorted.sort();
        let mut words: Vec<Vec<u32>> = Vec::with_capacity(sorted.len());
        let mut counts: Vec<u64> = Vec::with_capacity(sorted.len());
        for (w, &c) in sorted {
            let syms: Option<Vec<u32>> = w.chars().map(|ch| char_id.get(&ch).copied()).collect();
            let syms = syms.ok_or_else(|| {
                Error::Tokenizer("pre-tokenizer produced a non byte-level character".into())
            })?;
            words.push(syms);
            counts.push(c);
        }
        Ok((words, counts))
    }
}

/// The words being merged, with the pair counts kept up to date incrementally.
struct MergeState {
    words: Vec<Vec<u32>>,
    counts: Vec<u64>,
    pair_count: HashMap<(u32, u32), u64>,
    /// The words each pair occurs in.
    pair_words: HashMap<(u32, u32), HashSet<usize>>,
    /// Pairs by count, most frequent first, ties to the smaller pair; entries go stale as
    /// counts change and are skipped when popped (lazy deletion).
    heap: BinaryHeap<(u64, Reverse<(u32, u32)>)>,
}

impl MergeState {
    /// Counts the adjacent pairs of `words` (each seen `counts[i]` times).
    fn new(words: Vec<Vec<u32>>, counts: Vec<u64>) -> Self {
        let mut pair_count: HashMap<(u32, u32), u64> = HashMap::new();
        let mut pair_words: HashMap<(u32, u32), HashSet<usize>> = HashMap::new();
        for (wi, w) in words.iter().enumerate() {
            for p in w.windows(2) {
                let pair = (p[0], p[1]);
                *pair_count.entry(pair).or_insert(0) += counts[wi];
                pair_words.entry(pair).or_default().insert(wi);
            }
        }
        let heap: BinaryHeap<(u64, Reverse<(u32, u32)>)> =
            pair_count.iter().map(|(&p, &c)| (c, Reverse(p))).collect();
        MergeState {
            words,
            counts,
            pair_count,
            pair_words,
            heap,
        }
    }

    /// The most frequent pair, or `None` when no pair is left or the most frequent one is
    /// seen fewer than `min_frequency` times.
    fn next_pair(&mut self, min_frequency: u64) -> Option<(u32, u32)> {
        loop {
            let (count, Reverse(pair)) = self.heap.pop()?;
            // Lazy deletion: skip stale heap entries.
            if self.pair_count.get(&pair).copied() != Some(count) || count == 0 {
                continue;
            }
            if count < min_frequency {
                return None;
            }
            return Some(pair);
        }
    }

    /// Replaces every occurrence of `pair` by the symbol `new_id`, updating the pair counts
    /// and queueing the pairs whose counts changed.
    fn merge(&mut self, pair: (u32, u32), new_id: u32) {
        let affected: Vec<usize> = {
            let mut v: Vec<usize> = self
                .pair_words
                .remove(&pair)
                .unwrap_or_default()
                .into_iter()
                .collect();
            v.sort_unstable();
            v
        };
        let mut touched: HashSet<(u32, u32)> = HashSet::new();
        for wi in affected {
            self.merge_word(wi, pair, new_id, &mut touched);
        }
        self.pair_count.remove(&pair);
        let mut touched: Vec<(u32, u32)> = touched.into_iter().collect();
        touched.sort_unstable();
        for key in touched {
            match self.pair_count.get(&key) {
                Some(&c) if c > 0 => self.heap.push((c, Reverse(key))),
                _ => {
                    self.pair_count.remove(&key);
                }
            }
        }
    }

    /// Merges `pair` within word `wi`, moving its pair counts from the old symbols to the
    /// new ones; every pair whose count changed goes into `touched`.
    fn merge_word(
        &mut self,
        wi: usize,
        pair: (u32, u32),
        new_id: u32,
        touched: &mut HashSet<(u32, u32)>,
    ) {
        let old = std::mem::take(&mut self.words[wi]);
        let c = self.counts[wi];
        for p in old.windows(2) {
            let key = (p[0], p[1]);
            if let Some(x) = self.pair_count.get_mut(&key) {
                *x -= c;
            }
            touched.insert(key);
        }
        let merged = merge_pair(&old, pair, new_id);
        for p in merged.windows(2) {
            let key = (p[0], p[1]);
            *self.pair_count.entry(key).or_insert(0) += c;
            self.pair_words.entry(key).or_default().insert(wi);
            touched.insert(key);
        }
        self.words[wi] = merged;
    }
}

/// `word` with every non-overlapping occurrence of `pair`, left to right, replaced by `new_id`.
fn merge_pair(word: &[u32], pair: (u32, u32), new_id: u32) -> Vec<u32> {
    let mut merged = Vec::with_capacity(word.len());
    let mut i = 0;
    while i < word.len() {
        if i + 1 < word.len() && word[i] == pair.0 && word[i + 1] == pair.1 {
            merged.push(new_id);
            i += 2;
        } else {
            merged.push(word[i]);
            i += 1;
        }
    }
    merged
}

/// Builds the `tokenizer.json` document.
fn tokenizer_json(symbols: &[String], merges: &[(u32, u32)], special: &[String]) -> Value {
    let mut vocab = Map::new();
    for (i, s) in symbols.iter().enumerate() {
        vocab.insert(s.clone(), json!(i));
    }
    let mut added = Vec::new();
    for (j, s) in special.iter().enumerate() {
        let id = symbols.len() + j;
        vocab.insert(s.clone(), json!(id));
        added.push(json!({
            "id": id, "content": s, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    }
    let merges: Vec<Value> = merges
        .iter()
        .map(|&(a, b)| json!([symbols[a as usize], symbols[b as usize]]))
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::{HfTokenizer, Tokenizer};
    use std::path::Path;

    fn train(texts: &[&str], vocab_size: usize) -> HfTokenizer {
        let mut t = BpeTrainer::new();
        for x in texts {
            t.feed(x).unwrap();
        }
        let doc = t
            .train(&BpeOptions {
                vocab_size,
                ..Default::default()
            })
            .unwrap();
        HfTokenizer::from_bytes(serde_json::to_vec(&doc).unwrap(), Path::new("test")).unwrap()
    }

    #[test]
    fn learns_frequent_words_and_round_trips_any_text() {
        let texts = ["the cat sat on the mat. the cat was happy."; 20];
        let tok = train(&texts, 300);
        // Training stops early when no pair is seen twice any more.
        let v = tok.vocab_size();
        assert!(v > 260 && v <= 300, "{v}");
        let ids = tok.encode("the cat").unwrap();
        assert!(ids.len() <= 3, "{ids:?}");
        for s in [
            "the cat sat",
            "Ünïcödé 🦀 text\n\twith tabs",
            "",
            "  spaces  ",
        ] {
            let ids = tok.encode(s).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), s);
        }
        let eos = v as u32 - 1;
        assert_eq!(tok.eos_id(), Some(eos));
        assert_eq!(tok.encode("<|endoftext|>").unwrap(), vec![eos]);
    }

    #[test]
    fn training_is_deterministic() {
        let texts = ["a b c ab bc abc abcabc", "zzz yyy zzz"];
        let a = serde_json::to_string(&{
            let mut t = BpeTrainer::new();
            texts.iter().for_each(|x| t.feed(x).unwrap());
            t.train(&BpeOptions::default()).unwrap()
        })
        .unwrap();
        let b = serde_json::to_string(&{
            let mut t = BpeTrainer::new();
            texts.iter().for_each(|x| t.feed(x).unwrap());
            t.train(&BpeOptions::default()).unwrap()
        })
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn too_small_vocab_is_an_error() {
        let t = BpeTrainer::new();
        let e = t
            .train(&BpeOptions {
                vocab_size: 100,
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("too small"));
    }
}
