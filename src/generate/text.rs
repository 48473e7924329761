//! Text of a generation as it grows: token ids in, complete characters out.
//!
//! The continuation is decoded after the prompt, not on its own: a SentencePiece tokenizer
//! drops the leading space of the first piece of a text, which would glue the first word to
//! the prompt ("Lily.She"). A byte-level token can end inside a character, so a piece of text
//! is handed out only once it decodes to complete characters.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// The text of the tokens generated after a prompt, handed out piece by piece.
pub struct TextStream<'t> {
    tokenizer: &'t dyn Tokenizer,
    prompt_ids: Vec<u32>,
    /// The prompt's own decoded text.
    base: String,
    ids: Vec<u32>,
    /// The text handed out so far.
    printed: String,
}

impl<'t> TextStream<'t> {
    /// A stream of the text after `prompt_ids`.
    pub fn new(tokenizer: &'t dyn Tokenizer, prompt_ids: &[u32]) -> Result<Self> {
        Ok(TextStream {
            tokenizer,
            prompt_ids: prompt_ids.to_vec(),
            base: tokenizer.decode(prompt_ids)?,
            ids: Vec::new(),
            printed: String::new(),
        })
    }

    /// The generated ids so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The whole text of the generated ids (an incomplete last character as U+FFFD).
    pub fn text(&self) -> Result<String> {
        let mut all = self.prompt_ids.clone();
        all.extend_from_slice(&self.ids);
        let t = self.tokenizer.decode(&all)?;
        match t.strip_prefix(self.base.as_str()) {
            Some(rest) => Ok(rest.to_string()),
            None => self.tokenizer.decode(&self.ids),
        }
    }

    /// Adds a generated token; returns the new text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.text()?;
        if !text.ends_with('\u{FFFD}')
            && text.len() > self.printed.len()
            && text.starts_with(&self.printed)
        {
            let new = text[self.printed.len()..].to_string();
            self.printed = text;
            return Ok(Some(new));
        }
        Ok(None)
    }

    /// The text not handed out yet (at the end: whatever the last tokens decode to, an
    /// incomplete character included).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let text = self.text()?;
        if text.len() > self.printed.len() && text.starts_with(&self.printed) {
            let new = text[self.printed.len()..].to_string();
            self.printed = text;
            return Ok(Some(new));
        }
        Ok(None)
    }
}
