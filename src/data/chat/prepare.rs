//! `handgrad prepare --chat`: tokenizing chat JSONL files once into a prepared folder
//! (`chat.hgchat`, see [`super::file`], and a copy of the tokenizer file).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::data::encode_jsonl;
use super::examples::ChatEncoder;
use super::file::{CHAT_FILE_NAME, ChatFile, ChatFileMeta, write_chat_file};
use crate::error::{Error, Result};
use crate::util::fsutil::{create_dir_all, write_atomic};

/// What [`prepare_chat`] did.
#[derive(Debug, Clone, Default)]
pub struct ChatPrepareSummary {
    pub examples: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
    /// Token counts of the examples, in order (for length reports).
    pub lengths: Vec<usize>,
    pub file: PathBuf,
    pub seconds: f64,
}

impl ChatPrepareSummary {
    /// The longest example, in tokens.
    pub fn longest(&self) -> usize {
        self.lengths.iter().copied().max().unwrap_or(0)
    }

    /// Examples a run with `--seq seq` cuts (longer than `seq + 1` tokens).
    pub fn longer_than(&self, seq: usize) -> usize {
        self.lengths.iter().filter(|&&n| n > seq + 1).count()
    }
}

/// Tokenizes the JSONL `inputs` into `out/chat.hgchat` and copies the tokenizer file there.
/// `progress` is called with (files done, files) after each input.
pub fn prepare_chat(
    inputs: &[PathBuf],
    encoder: &ChatEncoder,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ChatPrepareSummary> {
    let t0 = Instant::now();
    let file = out.join(CHAT_FILE_NAME);
    if file.exists() {
        return Err(Error::invalid(format!(
            "{} already holds {CHAT_FILE_NAME}; choose an empty --out folder",
            out.display()
        )));
    }
    if inputs.is_empty() {
        return Err(Error::invalid("no input files"));
    }
    let mut offsets = vec![0usize];
    let mut ids = Vec::new();
    let mut train = Vec::new();
    let mut lengths = Vec::new();
    for (n, path) in inputs.iter().enumerate() {
        for e in encode_jsonl(path, encoder)? {
            lengths.push(e.ids.len());
            ids.extend_from_slice(&e.ids);
            train.extend_from_slice(&e.train);
            offsets.push(ids.len());
        }
        progress(n + 1, inputs.len());
    }
    let tok = encoder.tokenizer();
    let tpl = encoder.template();
    let trained_tokens = train.iter().filter(|&&t| t).count();
    let meta = ChatFileMeta {
        tokenizer_id: tok.id().to_string(),
        vocab_size: tok.vocab_size(),
        template_id: tpl.id(),
        template_source: tpl.source().to_string(),
        bos_token: tpl.bos_token().map(str::to_string),
        eos_token: tpl.eos_token().map(str::to_string),
        examples: lengths.len(),
        tokens: ids.len(),
        trained_tokens,
        sources: inputs.iter().map(|p| p.display().to_string()).collect(),
    };
    create_dir_all(out)?;
    let tokens = ids.len();
    write_chat_file(
        &file,
        &ChatFile {
            meta,
            offsets,
            ids,
            train,
        },
    )?;
    write_atomic(&out.join(tok.file_name()), |f| {
        f.write_all(tok.file_bytes())
    })?;
    Ok(ChatPrepareSummary {
        examples: lengths.len(),
        tokens,
        trained_tokens,
        lengths,
        file,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
