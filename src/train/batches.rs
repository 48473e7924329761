//! What a run trains on, as rows of a batch: windows of a token stream (pretraining data), or
//! chat examples, one per row, with only the assistant's tokens as targets (the others
//! [`IGNORE_TARGET`]). The trainer draws rows and validation batches from here without knowing
//! which.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::IGNORE_TARGET;
use crate::data::chat::{ChatData, ChatSampler, ChatSamplerState, ChatTemplate, config_dir_of};
use crate::data::{Dataset, SamplerState, WindowSampler};
use crate::error::{Error, Result};

/// The data of a run and where it is in it.
pub enum TrainData {
    /// Random windows of `seq + 1` tokens.
    Tokens {
        data: Dataset,
        sampler: WindowSampler,
        window: Vec<u32>,
    },
    /// Chat examples in shuffled epochs, one per row, right-padded.
    Chat {
        data: ChatData,
        sampler: ChatSampler,
        template: Box<ChatTemplate>,
    },
}

/// Where a run is in its data (saved in checkpoints for an exact resume).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataPosition {
    Tokens(SamplerState),
    Chat(ChatSamplerState),
}

/// One row of a batch: `seq` inputs and their `seq` targets.
pub type Row = (Vec<u32>, Vec<u32>);

impl TrainData {
    /// Token data with a sampler seeded for the run.
    pub fn tokens(data: Dataset, seq: usize, seed: u64) -> Self {
        TrainData::Tokens {
            sampler: WindowSampler::new(&data, seq, seed),
            window: vec![0; seq + 1],
            data,
        }
    }

    /// Chat data with a sampler seeded for the run.
    pub fn chat(data: ChatData, template: ChatTemplate, seed: u64) -> Self {
        TrainData::Chat {
            sampler: ChatSampler::new(&data, seed),
            data,
            template: Box::new(template),
        }
    }

    /// Re-seats the window sampler for the run's final sequence length (chat rows do not
    /// depend on it).
    pub fn reseat(&mut self, seq: usize, seed: u64) {
        if let TrainData::Tokens {
            data,
            sampler,
            window,
        } = self
        {
            *sampler = WindowSampler::new(data, seq, seed);
            *window = vec![0; seq + 1];
        }
    }

    /// Whether rows are chat examples (their loss is over the assistant's tokens only).
    pub fn is_chat(&self) -> bool {
        matches!(self, TrainData::Chat { .. })
    }

    /// The chat template of chat data.
    pub fn template(&self) -> Option<&ChatTemplate> {
        match self {
            TrainData::Chat { template, .. } => Some(template),
            TrainData::Tokens { .. } => None,
        }
    }

    /// Fills the next training row.
    pub fn next_row(&mut self, seq: usize, inputs: &mut [u32], targets: &mut [u32]) {
        match self {
            TrainData::Tokens {
                data,
                sampler,
                window,
            } => {
                sampler.next_window(data, window);
                inputs.copy_from_slice(&window[..seq]);
                targets.copy_from_slice(&window[1..]);
            }
            TrainData::Chat { data, sampler, .. } => {
                let k = sampler.next_example();
                data.fill_row(k, seq, inputs, targets);
            }
        }
    }

    /// Draws the next training row without filling it (another rank trains on it).
    pub fn skip_row(&mut self) {
        match self {
            TrainData::Tokens { sampler, .. } => sampler.skip_window(),
            TrainData::Chat { sampler, .. } => {
                sampler.next_example();
            }
        }
    }

    /// Up to `count` fixed validation rows.
    pub fn val_rows(&self, count: usize, seq: usize) -> Vec<Row> {
        match self {
            TrainData::Tokens { data, .. } => data
                .val_windows(count, seq)
                .into_iter()
                .map(|w| (w[..seq].to_vec(), w[1..].to_vec()))
                .collect(),
            TrainData::Chat { data, .. } => data
                .val
                .iter()
                .take(count)
                .map(|&k| {
                    let (mut i, mut t) = (vec![0; seq], vec![IGNORE_TARGET; seq]);
                    data.fill_row(k, seq, &mut i, &mut t);
                    (i, t)
                })
                .collect(),
        }
    }

    /// The data position to save.
    pub fn position(&self) -> DataPosition {
        match self {
            TrainData::Tokens { sampler, .. } => DataPosition::Tokens(sampler.state()),
            TrainData::Chat { sampler, .. } => DataPosition::Chat(sampler.state()),
        }
    }

    /// Continues from a saved position (of the same kind of data).
    pub fn restore(&mut self, p: &DataPosition) -> Result<()> {
        match (self, p) {
            (TrainData::Tokens { sampler, .. }, DataPosition::Tokens(s)) => sampler.restore(s),
            (TrainData::Chat { sampler, .. }, DataPosition::Chat(s)) => sampler.restore(s),
            _ => {
                return Err(Error::invalid(
                    "the checkpoint's data position is of another kind of data (chat examples vs token windows)",
                ));
            }
        }
        Ok(())
    }

    /// Tokens (chat: trained tokens) of the training and validation splits.
    pub fn sizes(&self) -> (usize, usize) {
        match self {
            TrainData::Tokens { data, .. } => (data.train_tokens(), data.val_tokens()),
            TrainData::Chat { data, .. } => {
                let trained = |ks: &[usize]| {
                    ks.iter()
                        .map(|&k| data.example(k).1.iter().filter(|&&t| t).count())
                        .sum()
                };
                (trained(&data.train), trained(&data.val))
            }
        }
    }

    /// How the validation split was made.
    pub fn split(&self) -> String {
        match self {
            TrainData::Tokens { data, .. } => data.split.clone(),
            TrainData::Chat { data, .. } => format!(
                "{} chat examples ({} train, {} validation); loss on the assistant's tokens only",
                data.len(),
                data.train.len(),
                data.val.len()
            ),
        }
    }

    /// What a user should know about rows of `seq` tokens: chat conversations longer than a
    /// row are cut (and some then have nothing left to train).
    pub fn row_warning(&self, seq: usize) -> Option<String> {
        let TrainData::Chat { data, .. } = self else {
            return None;
        };
        let s = data.stats(seq);
        (s.truncated > 0).then(|| {
            format!(
                "{} of {} conversations are longer than --seq {seq} tokens (the longest has {}) and are cut to it; {} of them keep no trained token; a longer --seq keeps them whole",
                s.truncated, s.examples, s.longest, s.nothing_left
            )
        })
    }

    /// Whether there is no validation data.
    pub fn val_is_empty(&self) -> bool {
        match self {
            TrainData::Tokens { data, .. } => data.val.is_empty(),
            TrainData::Chat { data, .. } => data.val.is_empty(),
        }
    }

    /// Checks every id fits the vocabulary and rows of `seq` tokens can be drawn.
    pub fn validate(&self, vocab: usize, seq: usize) -> Result<()> {
        match self {
            TrainData::Tokens { data, .. } => data.validate(vocab, seq),
            TrainData::Chat { data, .. } => {
                if data.train.is_empty() {
                    return Err(Error::invalid(format!(
                        "{}: no training examples",
                        data.path().display()
                    )));
                }
                data.validate(vocab)
            }
        }
    }

    /// Marks the token ids the data holds (vocabulary compaction).
    pub fn mark_present(&self, present: &mut [bool]) {
        match self {
            TrainData::Tokens { data, .. } => data.mark_present(present),
            TrainData::Chat { data, .. } => {
                for &id in data.parts().1 {
                    if let Some(p) = present.get_mut(id as usize) {
                        *p = true;
                    }
                }
            }
        }
    }
}

/// Whether `--data` names chat data: a `.jsonl` file whose first line is a conversation
/// (`messages`, or `prompt` and `completion`), a prepared chat file, or a folder holding one.
/// Other JSONL (`{"text": ...}` documents) is text to tokenize with `handgrad prepare`.
pub fn is_chat_data(path: &Path) -> bool {
    if path.is_dir() {
        return path.join(crate::data::chat::CHAT_FILE_NAME).is_file();
    }
    if crate::data::chat::file::is_chat_file(path) {
        return true;
    }
    if path.extension().is_none_or(|x| x != "jsonl") {
        return false;
    }
    use std::io::BufRead;
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    let first = std::io::BufReader::new(f)
        .lines()
        .map_while(|l| l.ok())
        .find(|l| !l.trim().is_empty());
    let Some(line) = first else {
        return false;
    };
    match serde_json::from_str::<serde_json::Value>(&line) {
        Ok(serde_json::Value::Object(o)) => {
            o.contains_key("messages") || (o.contains_key("prompt") && o.contains_key("completion"))
        }
        _ => false,
    }
}

/// The chat template of a run: `--chat-template FILE`, else the one prepared data was made
/// with, else the model's (`tokenizer_config.json` or `chat_template.jinja` in the
/// `--init-from` folder, or next to `--tokenizer`).
pub fn chat_template(
    data: &Path,
    template_file: Option<&str>,
    init_from: Option<&str>,
    tokenizer: Option<&str>,
) -> Result<ChatTemplate> {
    let prepared = if data.is_dir() {
        Some(data.join(crate::data::chat::CHAT_FILE_NAME))
    } else if crate::data::chat::file::is_chat_file(data) {
        Some(data.to_path_buf())
    } else {
        None
    };
    if let (None, Some(f)) = (template_file, prepared.filter(|f| f.is_file())) {
        let cf = crate::data::chat::file::read_chat_file(&f)?;
        let m = cf.meta;
        return ChatTemplate::from_source(
            &m.template_source,
            &f.display().to_string(),
            m.bos_token,
            m.eos_token,
        );
    }
    let dir: PathBuf = match (init_from, tokenizer) {
        (Some(m), _) => config_dir_of(Path::new(m)),
        (None, Some(t)) => config_dir_of(Path::new(t)),
        (None, None) => {
            if template_file.is_none() {
                return Err(Error::invalid(
                    "chat data needs the model's chat template: train with --init-from MODEL_DIR (its tokenizer_config.json), or give --chat-template FILE",
                ));
            }
            PathBuf::from(".")
        }
    };
    ChatTemplate::load(template_file.map(Path::new), &dir)
}
