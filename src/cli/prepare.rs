//! `handgrad prepare`.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::data::chat::{CHAT_FILE_NAME, ChatEncoder, ChatTemplate, config_dir_of, prepare_chat};
use crate::data::documents::{TextSplit, expand_inputs};
use crate::data::prepare::{PrepareOptions, prepare};
use crate::error::{Error, Result};
use crate::tokenizer;

/// Options of `handgrad prepare`.
#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// Text inputs: .txt files (documents separated by <|endoftext|>, see --split), .jsonl
    /// files with a "text" field, .json arrays of {"story": ...} (TinyStories shards), or folders;
    /// with --chat, .jsonl files of conversations.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Tokenizer: tokenizer.json or llama2.c tokenizer.bin, or a model folder holding one (with
    /// --chat, the tokenizer_config.json beside it gives the chat template and BOS/EOS).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Chat data: the inputs are JSONL conversations ({"messages": [...]} or {"prompt": ...,
    /// "completion": ...}), rendered with the model's chat template and tokenized into
    /// OUT/chat.hgchat with the mask of the assistant's tokens (docs/chat-data.md).
    #[arg(long)]
    chat: bool,
    /// With --chat: a Jinja chat template file to use instead of the model's.
    #[arg(long, value_name = "FILE", requires = "chat")]
    chat_template: Option<PathBuf>,
    /// Output folder for train-NNNNN.bin, val.bin and a copy of the tokenizer.
    #[arg(long)]
    out: PathBuf,
    /// Fraction of documents held out for validation (every 1/f-th document). Chat data is
    /// split when training, with train's --val-fraction.
    #[arg(long, default_value_t = 0.01, conflicts_with = "chat")]
    val_fraction: f64,
    /// Tokens per training shard file.
    #[arg(long, default_value_t = 100_000_000, conflicts_with = "chat")]
    shard_tokens: usize,
    /// How .txt files are cut into documents: auto (on <|endoftext|> when present, else one
    /// document per file), lines, file, or any delimiter string.
    #[arg(long, default_value = "auto", conflicts_with = "chat")]
    split: String,
    /// Also append EOS after each document when the tokenizer has a BOS (Llama-style
    /// tokenizers get BOS before each document; tokenizers without BOS get EOS after it).
    #[arg(long, conflicts_with = "chat")]
    eos: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(a: PrepareArgs) -> Result<()> {
    if a.chat {
        return run_chat(a);
    }
    let tok = tokenizer::load(&a.tokenizer)?;
    let inputs = expand_inputs(&a.inputs)?;
    let total: u64 = inputs
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let opts = PrepareOptions {
        inputs,
        out: a.out.clone(),
        val_fraction: a.val_fraction,
        shard_tokens: a.shard_tokens,
        split: TextSplit::parse(&a.split),
        force_eos: a.eos,
    };
    let pool = thread_pool(a.threads)?;
    let bar = if std::io::stderr().is_terminal() {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template("{spinner:.green} [{elapsed_precise}] {bar:30.cyan/blue} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let mut progress = |done: u64| {
        if let Some(b) = &bar {
            b.set_position(done);
        }
    };
    let s = pool.install(|| prepare(tok.as_ref(), &opts, &mut progress))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    println!(
        "{} documents ({} validation), {:.1} MB of text -> {} training + {} validation tokens ({:.3} tokens/byte) in {:.1}s ({:.1} MB/s)",
        s.documents,
        s.val_documents,
        s.bytes as f64 / 1e6,
        s.train_tokens,
        s.val_tokens,
        s.tokens_per_byte(),
        s.seconds,
        s.bytes as f64 / 1e6 / s.seconds.max(1e-9)
    );
    println!(
        "wrote {} file(s) and {} to {}",
        s.files.len(),
        tok.file_name(),
        a.out.display()
    );
    println!(
        "train with: handgrad train --data {} --model PRESET|config.json (or --init-from MODEL)",
        a.out.display()
    );
    Ok(())
}

fn thread_pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(t) = threads {
        builder = builder.num_threads(t.max(1));
    }
    builder
        .build()
        .map_err(|e| Error::invalid(format!("cannot start threads: {e}")))
}

/// `handgrad prepare --chat`.
fn run_chat(a: PrepareArgs) -> Result<()> {
    let tok = tokenizer::load(&a.tokenizer)?;
    let template = ChatTemplate::load(a.chat_template.as_deref(), &config_dir_of(&a.tokenizer))?;
    let encoder = ChatEncoder::new(&template, tok.as_ref())?;
    let pool = thread_pool(a.threads)?;
    let show = std::io::stderr().is_terminal();
    let mut progress = |done: usize, total: usize| {
        if show {
            eprint!("\rtokenized {done}/{total} file(s)");
            if done == total {
                eprintln!();
            }
        }
    };
    let s = pool.install(|| prepare_chat(&a.inputs, &encoder, &a.out, &mut progress))?;
    println!(
        "{} conversations -> {} tokens, {} of them trained ({:.1}%: the assistant's answers and end-of-turn markers) in {:.1}s",
        s.examples,
        s.tokens,
        s.trained_tokens,
        100.0 * s.trained_tokens as f64 / s.tokens.max(1) as f64,
        s.seconds
    );
    let seqs = [256, 512, 1024, 2048, 4096];
    println!(
        "longest conversation {} tokens; cut in training (longer than seq + 1) with --seq {}: {}",
        s.longest(),
        seqs.map(|q| q.to_string()).join("/"),
        seqs.map(|q| s.longer_than(q).to_string()).join("/")
    );
    println!(
        "chat template {} (an answer ends with {}); wrote {} and {} to {}",
        template.origin(),
        template.end_of_turn().unwrap_or("?"),
        CHAT_FILE_NAME,
        tok.file_name(),
        a.out.display()
    );
    Ok(())
}
