//! Chat fine-tuning data: a model's chat template ([`template`]), conversations in JSONL and
//! which of their tokens are trained ([`examples`]), batches and the sampler ([`data`]), and
//! the prepared file ([`file`], written by [`prepare`]). `docs/chat-data.md` describes the
//! formats and rules for users.

pub mod data;
pub mod examples;
pub mod file;
pub mod prepare;
pub mod template;

pub use data::{
    ChatData, ChatSampler, ChatSamplerState, ChatStats, IGNORE_TARGET, PAD_INPUT, encode_jsonl,
};
pub use examples::{ChatEncoder, ChatExample, Conversation, read_jsonl};
pub use file::{CHAT_FILE_NAME, ChatFile, ChatFileMeta};
pub use prepare::{ChatPrepareSummary, prepare_chat};
pub use template::{ChatTemplate, Message, RenderOptions, config_dir_of};

/// A character tokenizer for the unit tests: each listed special string is one id, every other
/// character is its code point + 1000, with byte offsets.
#[cfg(test)]
pub(crate) mod testing {
    use crate::error::Result;
    use crate::tokenizer::{TokenSpans, Tokenizer};

    pub struct CharTokenizer {
        pub specials: Vec<&'static str>,
    }

    impl Tokenizer for CharTokenizer {
        fn encode(&self, text: &str) -> Result<Vec<u32>> {
            Ok(self.encode_with_offsets(text)?.unwrap_or_default().ids)
        }
        fn encode_with_offsets(&self, text: &str) -> Result<Option<TokenSpans>> {
            let mut out = TokenSpans::default();
            let mut at = 0;
            while at < text.len() {
                let rest = &text[at..];
                if let Some((k, s)) = self
                    .specials
                    .iter()
                    .enumerate()
                    .find(|(_, s)| rest.starts_with(**s))
                {
                    out.ids.push(k as u32);
                    out.spans.push((at, at + s.len()));
                    at += s.len();
                } else if let Some(c) = rest.chars().next() {
                    out.ids.push(c as u32 + 1000);
                    out.spans.push((at, at + c.len_utf8()));
                    at += c.len_utf8();
                }
            }
            Ok(Some(out))
        }
        fn decode(&self, ids: &[u32]) -> Result<String> {
            Ok(ids
                .iter()
                .filter_map(|&i| {
                    if (i as usize) < self.specials.len() {
                        Some(self.specials[i as usize].to_string())
                    } else {
                        char::from_u32(i - 1000).map(String::from)
                    }
                })
                .collect())
        }
        fn vocab_size(&self) -> usize {
            0x11_0000 + 1000
        }
        fn bos_id(&self) -> Option<u32> {
            None
        }
        fn eos_id(&self) -> Option<u32> {
            None
        }
        fn id(&self) -> &str {
            "chars"
        }
        fn file_bytes(&self) -> &[u8] {
            b""
        }
        fn file_name(&self) -> &'static str {
            "tokenizer.json"
        }
    }
}
