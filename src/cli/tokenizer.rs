//! `handgrad tokenizer {train, encode, decode}`.

use std::io::{Read, Write};
use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::data::documents::{TextSplit, expand_inputs, read_documents};
use crate::error::{Error, Result};
use crate::tokenizer::bpe_train::{BpeOptions, BpeTrainer, END_OF_TEXT};
use crate::tokenizer::{self, Tokenizer};
use crate::util::fsutil::write_atomic;

/// Tokenizer tools.
#[derive(Args, Debug)]
pub struct TokenizerArgs {
    #[command(subcommand)]
    command: TokenizerCommand,
}

#[derive(Subcommand, Debug)]
enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer and write it as a Hugging Face tokenizer.json.
    Train {
        /// Text files (.txt, .jsonl with a "text" field, .json arrays of {"story": ...}) or
        /// folders of them.
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        /// Vocabulary size: 256 bytes + merges + special tokens.
        #[arg(long, default_value_t = 4096)]
        vocab_size: usize,
        /// Output file.
        #[arg(long, default_value = "tokenizer.json")]
        out: PathBuf,
        /// Special tokens (added after the merges).
        #[arg(long = "special", default_values_t = [END_OF_TEXT.to_string()])]
        special: Vec<String>,
        /// Pairs seen fewer times are not merged.
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        /// How plain-text files are cut into documents: auto (on <|endoftext|> if present),
        /// lines, file, or a delimiter string.
        #[arg(long, default_value = "auto")]
        split: String,
    },
    /// Read text on stdin and print its token ids as a JSON array.
    Encode {
        /// tokenizer.json or tokenizer.bin.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Prepend the beginning-of-sequence id (if the tokenizer has one).
        #[arg(long)]
        bos: bool,
        /// Append the end-of-sequence id.
        #[arg(long)]
        eos: bool,
    },
    /// Read a JSON array of token ids on stdin and print the text.
    Decode {
        /// tokenizer.json or tokenizer.bin.
        #[arg(long)]
        tokenizer: PathBuf,
    },
}

fn stdin_string() -> Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .map_err(|e| Error::io("reading", "standard input", e))?;
    Ok(s)
}

pub fn run(a: TokenizerArgs) -> Result<()> {
    match a.command {
        TokenizerCommand::Train {
            input,
            vocab_size,
            out,
            special,
            min_frequency,
            split,
        } => {
            let files = expand_inputs(&input)?;
            let split = TextSplit::parse(&split);
            let mut trainer = BpeTrainer::new();
            let mut docs = 0usize;
            let mut bytes = 0usize;
            for f in &files {
                for d in read_documents(f, &split)? {
                    bytes += d.len();
                    docs += 1;
                    trainer.feed(&d)?;
                }
            }
            let doc = trainer.train(&BpeOptions {
                vocab_size,
                special_tokens: special,
                min_frequency,
            })?;
            let text = serde_json::to_vec_pretty(&doc)
                .map_err(|e| Error::json("writing tokenizer.json", e))?;
            write_atomic(&out, |f| f.write_all(&text))?;
            let tok = tokenizer::load(&out)?;
            eprintln!(
                "trained on {docs} documents ({bytes} bytes, {} distinct words) from {} file(s): {} ids -> {}",
                trainer.distinct_words(),
                files.len(),
                tok.vocab_size(),
                out.display()
            );
            if tok.vocab_size() < vocab_size {
                eprintln!(
                    "note: stopped at {} ids: no pair occurs {min_frequency} times any more",
                    tok.vocab_size()
                );
            }
            Ok(())
        }
        TokenizerCommand::Encode {
            tokenizer,
            bos,
            eos,
        } => {
            let tok = tokenizer::load(&tokenizer)?;
            let text = stdin_string()?;
            let mut ids = Vec::new();
            if bos && let Some(b) = tok.bos_id() {
                ids.push(b);
            }
            ids.extend(tok.encode(&text)?);
            if eos && let Some(e) = tok.eos_id() {
                ids.push(e);
            }
            println!(
                "{}",
                serde_json::to_string(&ids).map_err(|e| Error::json("writing ids", e))?
            );
            Ok(())
        }
        TokenizerCommand::Decode { tokenizer } => {
            let tok: Box<dyn Tokenizer> = tokenizer::load(&tokenizer)?;
            let ids: Vec<u32> = serde_json::from_str(&stdin_string()?)
                .map_err(|e| Error::json("standard input must be a JSON array of token ids", e))?;
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= tok.vocab_size()) {
                return Err(Error::invalid(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    tok.vocab_size()
                )));
            }
            print!("{}", tok.decode(&ids)?);
            let _ = std::io::stdout().flush();
            Ok(())
        }
    }
}
