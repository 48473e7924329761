//! Chat examples: reading JSONL conversations and tokenizing them with the model's template
//! into ids and a per-token "trained" mask.
//!
//! # Input lines
//!
//! One JSON object per line (blank lines are skipped), in one of the forms fine-tuning tools
//! share:
//! * `{"messages": [{"role": "system"|"user"|"assistant"|..., "content": "..."}, ...]}`
//!   (OpenAI fine-tuning, Hugging Face); an optional `"tools"` list reaches the template, and an
//!   assistant message with `"weight": 0` is shown to the model but not trained on;
//! * `{"prompt": "...", "completion": "..."}`: a user message and the assistant's answer;
//! * `{"prompt": [messages], "completion": [messages]}` (TRL's conversational form): only the
//!   completion's assistant messages are trained, never an assistant message of the prompt.
//!
//! # Which tokens are trained
//!
//! The example's tokens are those of the whole conversation rendered by the template (what
//! `apply_chat_template(messages, tokenize=True)` gives). The trained text of an assistant
//! message `i` is the character range `[s, e)` of that rendering where
//! * `s` is the length of the rendering of `messages[..i]` with the generation prompt, which
//!   must be a prefix of the whole rendering: that prefix is exactly what the model is given
//!   when it is asked to write message `i`, so everything after it up to the end of the turn is
//!   the model's to write. This is what holds when a template rewrites earlier turns (Qwen3
//!   drops the `<think>` block of every answer before the last user message, and writes an
//!   empty one into the last answer): the trained text is what the whole rendering holds, and
//!   the text before it is what a prompt holds at inference time. A template for which the
//!   prefix is not a prefix of the whole (it rewrites the turn *before* message `i` once more
//!   messages follow) is refused for that example, since no sound split exists;
//! * `e` is the end of the first end-of-turn marker ([`ChatTemplate::end_of_turn`]) at or after
//!   `s` (the end of the text when there is none): the model learns to close its turn, and the
//!   whitespace the template writes after the marker is scaffolding (generation stops at the
//!   marker).
//!
//! System and user messages, the template's headers, the generation prompt and everything
//! after the marker are masked. A token is trained when its byte range in the rendering
//! overlaps a trained range, the rule `transformers` applies to `{% generation %}` ranges;
//! ranges come from tokenizing the whole rendering once with offsets, so the ids are exactly
//! those of one tokenization (no piecewise concatenation) and special tokens such as
//! `<|im_start|>` are the tokenizer's single added ids.

use std::path::Path;

use minijinja::Value;
use minijinja::value::ValueKind;
use serde::Deserialize;

use super::template::{ChatTemplate, Message, RenderOptions};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// A conversation to train on.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    pub messages: Vec<Message>,
    /// The `tools` list handed to the template, if the line has one.
    pub tools: Option<Value>,
    /// Messages before this index are never trained (the prompt of a prompt/completion line).
    pub first_trained: usize,
}

impl Conversation {
    /// A conversation whose assistant messages are all trained.
    pub fn new(messages: Vec<Message>) -> Self {
        Conversation {
            messages,
            tools: None,
            first_trained: 0,
        }
    }

    /// Reads one JSONL line (module documentation); `None` for a blank line. The error says
    /// what is wrong, without the file and line (the caller adds them). JSON objects keep the
    /// order of their keys.
    pub fn parse(line: &str) -> std::result::Result<Option<Self>, String> {
        if line.trim().is_empty() {
            return Ok(None);
        }
        let v: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
        if v.kind() != ValueKind::Map {
            return Err("expected a JSON object".to_string());
        }
        let field = |name: &str| {
            v.get_attr(name)
                .ok()
                .filter(|x| !x.is_undefined() && !x.is_none())
        };
        let tools = field("tools");
        let conv = match (field("messages"), field("prompt"), field("completion")) {
            (Some(m), None, None) => Conversation {
                messages: messages_of(&m, "messages")?,
                tools,
                first_trained: 0,
            },
            (None, Some(p), Some(c))
                if p.kind() == ValueKind::String && c.kind() == ValueKind::String =>
            {
                let text = |x: &Value| x.as_str().unwrap_or_default().to_string();
                Conversation {
                    messages: vec![
                        Message::new("user", text(&p)),
                        Message::new("assistant", text(&c)),
                    ],
                    tools,
                    first_trained: 1,
                }
            }
            (None, Some(p), Some(c))
                if p.kind() == ValueKind::Seq && c.kind() == ValueKind::Seq =>
            {
                let mut messages = messages_of(&p, "prompt")?;
                let first_trained = messages.len();
                messages.extend(messages_of(&c, "completion")?);
                Conversation {
                    messages,
                    tools,
                    first_trained,
                }
            }
            (None, Some(_), Some(_)) => {
                return Err(
                    "\"prompt\" and \"completion\" must both be strings or both be lists of messages"
                        .to_string(),
                );
            }
            _ => {
                return Err(
                    "expected {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...}"
                        .to_string(),
                );
            }
        };
        if conv.messages.is_empty() {
            return Err("the conversation has no messages".to_string());
        }
        Ok(Some(conv))
    }

    /// Whether message `i` is trained: an assistant message of the trained part without
    /// `"weight": 0`.
    fn trains(&self, i: usize) -> std::result::Result<bool, String> {
        let m = &self.messages[i];
        if m.role != "assistant" || i < self.first_trained {
            return Ok(false);
        }
        let weight = |w: &Value| f64::try_from(w.clone()).ok();
        match m.extra.get("weight") {
            None => Ok(true),
            Some(w) if weight(w) == Some(1.0) => Ok(true),
            Some(w) if weight(w) == Some(0.0) => Ok(false),
            Some(w) => Err(format!("message {i}: \"weight\" must be 0 or 1, got {w}")),
        }
    }
}

/// The messages of a JSON list (`field` names it in errors).
fn messages_of(v: &Value, field: &str) -> std::result::Result<Vec<Message>, String> {
    if v.kind() != ValueKind::Seq {
        return Err(format!("\"{field}\" must be a list of messages"));
    }
    let items: Vec<Value> = v.try_iter().map_err(|e| e.to_string())?.collect();
    items
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            if m.kind() != ValueKind::Map {
                return Err(format!("{field}[{i}]: a message must be a JSON object"));
            }
            match m.get_attr("role").ok().map(|r| r.kind()) {
                Some(ValueKind::String) => {}
                Some(ValueKind::Undefined) | None => {
                    return Err(format!("{field}[{i}]: missing \"role\""));
                }
                Some(_) => return Err(format!("{field}[{i}]: \"role\" must be a string")),
            }
            let content = m.get_attr("content").ok().map(|c| c.kind());
            if !matches!(
                content,
                None | Some(ValueKind::String | ValueKind::None | ValueKind::Undefined)
            ) {
                return Err(format!(
                    "{field}[{i}]: \"content\" must be a string (lists of content parts are not supported)"
                ));
            }
            Message::deserialize(m).map_err(|e| format!("{field}[{i}]: {e}"))
        })
        .collect()
}

/// Reads a JSONL file of conversations; each comes with its line number (from 1). Errors name
/// the file and the line.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, Conversation)>> {
    let text = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    let text = String::from_utf8(text).map_err(|e| {
        Error::data(
            path,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        match Conversation::parse(line) {
            Ok(Some(c)) => out.push((n + 1, c)),
            Ok(None) => {}
            Err(e) => return Err(Error::data(path, format!("line {}: {e}", n + 1))),
        }
    }
    if out.is_empty() {
        return Err(Error::data(path, "the file holds no conversations"));
    }
    Ok(out)
}

/// A tokenized conversation: `train[i]` says whether token `i` is one the loss counts (module
/// documentation).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChatExample {
    pub ids: Vec<u32>,
    pub train: Vec<bool>,
}

impl ChatExample {
    /// Number of trained tokens.
    pub fn trained(&self) -> usize {
        self.train.iter().filter(|&&t| t).count()
    }
}

/// Tokenizes conversations with a template and a tokenizer.
pub struct ChatEncoder<'a> {
    template: &'a ChatTemplate,
    tok: &'a dyn Tokenizer,
    marker: &'a str,
}

impl<'a> ChatEncoder<'a> {
    /// Checks that the pair can make training examples: the tokenizer reports offsets, the
    /// template has an end-of-turn marker, and a marker that looks like a special token
    /// (`<...>`) is one token of this tokenizer (else the template and tokenizer do not belong
    /// together).
    pub fn new(template: &'a ChatTemplate, tok: &'a dyn Tokenizer) -> Result<Self> {
        let marker = template.end_of_turn().ok_or_else(|| {
            Error::invalid(format!(
                "the chat template ({}) writes nothing but whitespace after an assistant's message (or fails on a plain user/assistant conversation), so the model could not learn where an answer ends",
                template.origin()
            ))
        })?;
        if tok.encode_with_offsets("a")?.is_none() {
            return Err(Error::invalid(format!(
                "chat data needs a Hugging Face tokenizer.json (this {} tokenizer cannot say which text each token comes from)",
                tok.file_name()
            )));
        }
        if marker.starts_with('<') && marker.ends_with('>') {
            let n = tok.encode(marker)?.len();
            if n != 1 {
                return Err(Error::invalid(format!(
                    "the chat template ({}) ends an assistant turn with {marker}, which this tokenizer splits into {n} tokens: is the tokenizer the model's own?",
                    template.origin()
                )));
            }
        }
        Ok(ChatEncoder {
            template,
            tok,
            marker,
        })
    }

    /// The template.
    pub fn template(&self) -> &ChatTemplate {
        self.template
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &dyn Tokenizer {
        self.tok
    }

    /// The whole rendering of a conversation and the byte ranges of it that are trained.
    pub fn trained_text(&self, conv: &Conversation) -> Result<(String, Vec<(usize, usize)>)> {
        let opts = RenderOptions {
            tools: conv.tools.clone(),
            enable_thinking: None,
        };
        let full = self.template.render_with(&conv.messages, false, &opts)?;
        let mut ranges = Vec::new();
        for i in 0..conv.messages.len() {
            if !conv.trains(i).map_err(Error::invalid)? {
                continue;
            }
            let prefix = self
                .template
                .render_with(&conv.messages[..i], true, &opts)?;
            if !full.starts_with(&prefix) {
                return Err(Error::invalid(format!(
                    "message {i}: the template renders the conversation before this assistant message (with the generation prompt) differently from the start of the whole conversation, so the assistant's part cannot be told apart"
                )));
            }
            let s = prefix.len();
            let e = full[s..]
                .find(self.marker)
                .map_or(full.len(), |p| s + p + self.marker.len());
            ranges.push((s, e));
        }
        if ranges.is_empty() {
            return Err(Error::invalid(
                "no assistant message to train on (roles must be \"assistant\"; \"weight\": 0 messages and prompts are not trained)",
            ));
        }
        Ok((full, ranges))
    }

    /// Tokenizes a conversation (module documentation).
    pub fn encode(&self, conv: &Conversation) -> Result<ChatExample> {
        let (full, ranges) = self.trained_text(conv)?;
        let ts = self
            .tok
            .encode_with_offsets(&full)?
            .ok_or_else(|| Error::invalid("chat data needs a tokenizer that reports offsets"))?;
        let train = ts
            .spans
            .iter()
            .map(|&(a, b)| {
                let b = b.max(a + 1);
                ranges.iter().any(|&(s, e)| a < e && b > s)
            })
            .collect();
        Ok(ChatExample { ids: ts.ids, train })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::CharTokenizer;
    use super::*;

    /// Qwen3's way of rewriting turns, cut down: answers lose their `<think>` block, and the
    /// last message, when an answer, gets an (empty) one.
    const THINKER: &str = "{%- for m in messages %}{%- if m.role == 'assistant' %}{%- set c = m.content.split('</think>')[-1].lstrip('\n') %}\
{%- if loop.last %}{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' + c }}{%- else %}{{- '<|im_start|>assistant\n' + c }}{%- endif %}\
{%- else %}{{- '<|im_start|>' + m.role + '\n' + m.content }}{%- endif %}{{- '<|im_end|>\n' }}{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}";

    fn tok() -> CharTokenizer {
        CharTokenizer {
            specials: vec!["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        }
    }

    /// The trained tokens of an example as text, runs joined by `|`.
    fn trained_text(tok: &CharTokenizer, e: &ChatExample) -> String {
        let mut runs: Vec<Vec<u32>> = Vec::new();
        let mut prev = false;
        for (&id, &t) in e.ids.iter().zip(&e.train) {
            if t {
                if !prev {
                    runs.push(Vec::new());
                }
                if let Some(r) = runs.last_mut() {
                    r.push(id);
                }
            }
            prev = t;
        }
        runs.iter()
            .map(|r| tok.decode(r).unwrap())
            .collect::<Vec<_>>()
            .join("|")
    }

    #[test]
    fn masks_everything_but_the_answers_and_their_end_marker() {
        let tpl = ChatTemplate::from_source(THINKER, "thinker", None, None).unwrap();
        let tok = tok();
        let enc = ChatEncoder::new(&tpl, &tok).unwrap();
        let conv = Conversation::new(vec![
            Message::new("system", "S"),
            Message::new("user", "Q1"),
            Message::new("assistant", "<think>\nr\n</think>\n\nA1"),
            Message::new("user", "Q2"),
            Message::new("assistant", "A2"),
        ]);
        let e = enc.encode(&conv).unwrap();
        assert_eq!(
            e.ids,
            tok.encode(&tpl.render(&conv.messages, false).unwrap())
                .unwrap()
        );
        // The earlier answer lost its reasoning in the whole rendering; the last one trains its
        // empty think block too (it follows the generation prompt).
        assert_eq!(
            trained_text(&tok, &e),
            "A1<|im_end|>|<think>\n\n</think>\n\nA2<|im_end|>"
        );
        // "weight": 0 shows an answer without training it.
        let mut w = conv.clone();
        w.messages[2].extra.insert("weight".into(), Value::from(0));
        assert_eq!(
            trained_text(&tok, &enc.encode(&w).unwrap()),
            "<think>\n\n</think>\n\nA2<|im_end|>"
        );
        // A prompt/completion example trains only the completion.
        let pc = Conversation::parse(r#"{"prompt": "Q", "completion": "A"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(
            trained_text(&tok, &enc.encode(&pc).unwrap()),
            "<think>\n\n</think>\n\nA<|im_end|>"
        );
    }

    #[test]
    fn refuses_what_cannot_be_split_or_trained() {
        let tpl = ChatTemplate::from_source(THINKER, "thinker", None, None).unwrap();
        let tok = tok();
        let enc = ChatEncoder::new(&tpl, &tok).unwrap();
        let none = Conversation::new(vec![Message::new("user", "Q")]);
        assert!(
            enc.encode(&none)
                .unwrap_err()
                .to_string()
                .contains("no assistant message")
        );
        // Two answers in a row: the first is the last turn in the prefix (think block) but not
        // in the whole rendering.
        let twice = Conversation::new(vec![
            Message::new("user", "Q"),
            Message::new("assistant", "A"),
            Message::new("assistant", "B"),
        ]);
        let e = enc.encode(&twice).unwrap_err().to_string();
        assert!(
            e.contains("message 2") && e.contains("cannot be told apart"),
            "{e}"
        );
        // A template whose end marker the tokenizer does not know as one token.
        let plain = CharTokenizer { specials: vec![] };
        let e = ChatEncoder::new(&tpl, &plain)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("<|im_end|>") && e.contains("splits into 10 tokens"),
            "{e}"
        );
        // A template that writes nothing after an answer.
        let bare = ChatTemplate::from_source(
            "{% for m in messages %}{{ m.content }}\n{% endfor %}",
            "bare",
            None,
            None,
        )
        .unwrap();
        let e = ChatEncoder::new(&bare, &tok)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("could not learn where an answer ends"), "{e}");
    }

    #[test]
    fn parses_each_form() {
        let m = Conversation::parse(r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null, "tool_calls": []}]}"#)
            .unwrap()
            .unwrap();
        assert_eq!(m.messages.len(), 2);
        assert_eq!(m.messages[1].content, "");
        assert!(m.messages[1].extra.contains_key("tool_calls"));
        assert_eq!(m.first_trained, 0);
        let p = Conversation::parse(r#"{"prompt": "q", "completion": "a"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(
            p.messages,
            vec![Message::new("user", "q"), Message::new("assistant", "a")]
        );
        assert_eq!(p.first_trained, 1);
        let t = Conversation::parse(
            r#"{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}, {"role": "user", "content": "r"}], "completion": [{"role": "assistant", "content": "a"}]}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(t.first_trained, 3);
        assert!(!t.trains(1).unwrap() && t.trains(3).unwrap());
        assert_eq!(Conversation::parse("  ").unwrap(), None);
    }

    #[test]
    fn bad_lines_say_why() {
        for (line, want) in [
            ("{", "not valid JSON"),
            ("[1]", "expected a JSON object"),
            (r#"{"text": "x"}"#, "expected {\"messages\""),
            (r#"{"prompt": "x", "completion": []}"#, "both be strings"),
            (
                r#"{"messages": [{"content": "x"}]}"#,
                "messages[0]: missing \"role\"",
            ),
            (
                r#"{"messages": [{"role": 1}]}"#,
                "\"role\" must be a string",
            ),
            (r#"{"messages": [3]}"#, "must be a JSON object"),
            (
                r#"{"messages": [{"role": "user", "content": [{"type": "text"}]}]}"#,
                "must be a string",
            ),
            (r#"{"messages": []}"#, "no messages"),
        ] {
            let e = Conversation::parse(line).unwrap_err();
            assert!(e.contains(want), "{line}: {e}");
        }
        let c = Conversation::parse(
            r#"{"messages": [{"role": "assistant", "content": "x", "weight": 2}]}"#,
        )
        .unwrap()
        .unwrap();
        assert!(c.trains(0).unwrap_err().contains("weight"));
    }

    #[test]
    fn read_jsonl_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("chat.jsonl");
        std::fs::write(
            &p,
            "{\"prompt\": \"q\", \"completion\": \"a\"}\n\n{\"messages\": 3}\n",
        )
        .unwrap();
        let e = read_jsonl(&p).unwrap_err().to_string();
        assert!(e.contains("chat.jsonl") && e.contains("line 3:"), "{e}");
        std::fs::write(&p, "\n{\"prompt\": \"q\", \"completion\": \"a\"}\n").unwrap();
        let ok = read_jsonl(&p).unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].0, 2);
    }
}
