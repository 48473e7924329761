//! Hugging Face `tokenizer.json` tokenizers via the `tokenizers` crate.

use std::path::Path;

use super::{TokenSpans, Tokenizer, fnv1a64};
use crate::error::{Error, Result};

/// A tokenizer loaded from a `tokenizer.json`.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    bytes: Vec<u8>,
    id: String,
    bos: Option<u32>,
    eos: Option<u32>,
    stops: Vec<u32>,
}

/// Special tokens recognised as end of sequence, most specific first.
const EOS_NAMES: &[&str] = &[
    "</s>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<eos>",
];
/// Special tokens recognised as beginning of sequence.
const BOS_NAMES: &[&str] = &["<s>", "<|begin_of_text|>", "<bos>"];

impl HfTokenizer {
    /// Parses `tokenizer.json` bytes; `origin` names the file in errors.
    pub fn from_bytes(bytes: Vec<u8>, origin: &Path) -> Result<Self> {
        // Checked as JSON first: the `tokenizers` crate panics on some malformed documents
        // (an `expect` in its decoder deserializer) instead of returning an error.
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            Error::Tokenizer(format!(
                "{}: not a valid tokenizer.json: not UTF-8 text ({e})",
                origin.display()
            ))
        })?;
        if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
            return Err(Error::Tokenizer(format!(
                "{}: not a valid tokenizer.json: not valid JSON: {e}",
                origin.display()
            )));
        }
        // Some valid JSON still makes the crate panic (`expect`s in its normalizer
        // deserializer): a panic there is a malformed file, not a crash.
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(&bytes))
            .map_err(|_| {
                Error::Tokenizer(format!(
                    "{}: not a valid tokenizer.json (the tokenizers library rejected its structure)",
                    origin.display()
                ))
            })?;
        let inner = parsed.map_err(|e| {
            Error::Tokenizer(format!(
                "{}: not a valid tokenizer.json: {e}",
                origin.display()
            ))
        })?;
        // Only special added tokens count: "</s>" can be an ordinary piece of a vocabulary.
        let special: std::collections::HashMap<String, u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (t.content, id))
            .collect();
        let find = |names: &[&str]| names.iter().find_map(|n| special.get(*n).copied());
        let eos = find(EOS_NAMES);
        let bos = find(BOS_NAMES);
        let stops: Vec<u32> = EOS_NAMES
            .iter()
            .filter_map(|n| special.get(*n).copied())
            .collect();
        let id = format!("hf-{:016x}", fnv1a64(&bytes));
        Ok(HfTokenizer {
            inner,
            bytes,
            id,
            bos,
            eos,
            stops,
        })
    }

    /// The wrapped `tokenizers` object.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

impl Tokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    fn encode_with_offsets(&self, text: &str) -> Result<Option<TokenSpans>> {
        // `encode` (unlike `encode_fast`) tracks offsets, in bytes of the input.
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(Some(TokenSpans {
            ids: enc.get_ids().to_vec(),
            spans: enc.get_offsets().to_vec(),
        }))
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(format!("decoding failed: {e}")))
    }

    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
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
        "tokenizer.json"
    }

    fn stop_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.stops.clone();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}
