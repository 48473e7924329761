//! `handgrad eval`: validation perplexity with the weights in each inference format.

use std::path::PathBuf;

use clap::Args;

use std::path::Path;

use crate::data::chat::{ChatData, ChatEncoder, config_dir_of};
use crate::data::{Dataset, builtin};
use crate::error::{Error, Result};
use crate::eval::{Perplexity, perplexity};
use crate::formats::load_model;
use crate::generate::WeightFormat;
use crate::run::DataSource;
use crate::tokenizer;
use crate::train::batches::{TrainData, chat_template, is_chat_data};

/// Options of `handgrad eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A run folder: its checkpoints/latest (or best with --best) on its own validation split.
    #[arg(long, conflicts_with = "model")]
    run_dir: Option<PathBuf>,
    /// A model in any supported format (with --data).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Use checkpoints/best instead of latest.
    #[arg(long)]
    best: bool,
    /// Token shards (a folder or a .bin shard from `handgrad prepare`) whose validation split
    /// is used [default with --run-dir: the run's data].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Fraction of the data held out for validation when it has no val shards.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Weight formats to compare, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fp32,bf16,q8"
    )]
    weights: Vec<WeightFormat>,
    /// Validation windows, evenly spread over the split [default with --run-dir: the run's
    /// own (its --eval-batches x --batch), so the fp32 loss is the run's validation loss at
    /// that checkpoint; else 64].
    #[arg(long)]
    windows: Option<usize>,
    /// Tokens per window [default: the run's sequence length, else 256, at most the model's
    /// context].
    #[arg(long)]
    seq: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Worker threads (default: physical cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

/// What `eval` measures: the model, the data, the defaults of the run it came from, and
/// what its numbers are compared with (said under the table).
struct Target {
    model: PathBuf,
    data: TrainData,
    seq_default: usize,
    windows_default: usize,
    note: Option<String>,
}

fn target(a: &EvalArgs) -> Result<Target> {
    match (&a.run_dir, &a.model) {
        (Some(dir), None) => run_target(a, dir),
        (None, Some(m)) => {
            let Some(d) = &a.data else {
                return Err(Error::invalid(
                    "--model needs --data (token shards from handgrad prepare)",
                ));
            };
            Ok(Target {
                model: m.clone(),
                data: open_data(d, a.val_fraction, &config_dir_of(m))?,
                seq_default: 256,
                windows_default: 64,
                note: None,
            })
        }
        _ => Err(Error::invalid("give --run-dir or --model")),
    }
}

/// A run's checkpoint, on the run's data and validation windows unless told otherwise.
fn run_target(a: &EvalArgs, dir: &std::path::Path) -> Result<Target> {
    let run = crate::run::RunDir::existing(dir)?;
    let model = run.checkpoint_to_read(a.best)?;
    let cfg = run.saved_config()?;
    let data = match (&a.data, DataSource::parse(&cfg.data)) {
        (Some(d), _) => open_data(d, a.val_fraction, dir)?,
        (None, DataSource::Builtin) => TrainData::tokens(
            builtin::ensure(&builtin::cache_root(), &mut |m| eprintln!("{m}"))?.dataset()?,
            cfg.seq,
            cfg.seed,
        ),
        (None, DataSource::Tokens(p) | DataSource::Folder(p)) => {
            open_data(&p, cfg.val_fraction, dir)?
        }
    };
    let note = if cfg.vocab_compaction {
        "the run validated with vocabulary compaction (a compacted loss); these losses are over the full vocabulary, so they are higher".to_string()
    } else if a.windows.is_none() && a.seq.is_none() && a.data.is_none() {
        format!(
            "the run's own validation windows ({} = --eval-batches {} x --batch {}): fp32 is its validation loss at this checkpoint",
            cfg.eval_batches * cfg.batch,
            cfg.eval_batches,
            cfg.batch
        )
    } else {
        "other windows than the run validated on (--windows, --seq or --data given): losses differ from its validation loss by sampling".to_string()
    };
    Ok(Target {
        model,
        data,
        seq_default: cfg.seq,
        windows_default: (cfg.eval_batches * cfg.batch).max(1),
        note: Some(note),
    })
}

/// Token data, or chat data (its masked loss: the assistant's tokens only) rendered with the
/// template and tokenizer of the model folder or chat run `model_dir`.
fn open_data(path: &Path, val_fraction: f64, model_dir: &Path) -> Result<TrainData> {
    if !is_chat_data(path) {
        return Ok(TrainData::tokens(Dataset::open(path, val_fraction)?, 1, 0));
    }
    let template = chat_template(path, None, Some(&model_dir.display().to_string()), None)?;
    let Some(tok_path) = tokenizer::find_in_dir(model_dir) else {
        return Err(Error::invalid(format!(
            "chat data is tokenized with the model's tokenizer, and {} has none",
            model_dir.display()
        )));
    };
    let tok = tokenizer::load(&tok_path)?;
    let encoder = ChatEncoder::new(&template, tok.as_ref())?;
    let chat = ChatData::open(path, &encoder, val_fraction)?;
    Ok(TrainData::chat(chat, template, 0))
}

pub fn run(a: EvalArgs) -> Result<()> {
    let Target {
        model: path,
        data,
        seq_default,
        windows_default,
        note,
    } = target(&a)?;
    let loaded = load_model(&path)?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let model = loaded.transformer();
    let seq = a.seq.unwrap_or(seq_default).min(model.cfg.max_seq_len);
    let mut data = data;
    data.reseat(seq, 0);
    data.validate(model.cfg.vocab_size, seq)?;
    let windows = data.val_rows(a.windows.unwrap_or(windows_default), seq);
    if windows.is_empty() {
        return Err(Error::invalid(format!(
            "the validation split has no window of {} tokens",
            seq + 1
        )));
    }
    let pool = super::thread_pool(a.threads)?;
    let kernels = crate::backend::Backend::default().kernels()?;
    let mut results: Vec<Perplexity> = Vec::new();
    for &w in &a.weights {
        let r = pool.install(|| {
            perplexity(
                &model,
                &loaded.params,
                kernels.as_ref(),
                &windows,
                a.batch,
                w,
            )
        })?;
        if !a.json {
            eprintln!(
                "{w}: loss {:.4}, perplexity {:.3} ({} tokens, {:.1}s)",
                r.loss, r.perplexity, r.tokens, r.seconds
            );
        }
        results.push(r);
    }
    if a.json {
        let out = serde_json::json!({
            "model": path.display().to_string(),
            "windows": windows.len(),
            "seq": seq,
            "results": results,
            "note": note,
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(());
    }
    print_table(&path, windows.len(), seq, &results, note.as_deref());
    Ok(())
}

/// The Markdown table of the results, with what they are compared with.
fn print_table(
    path: &std::path::Path,
    windows: usize,
    seq: usize,
    results: &[Perplexity],
    note: Option<&str>,
) {
    let base = results
        .iter()
        .find(|r| r.weights == WeightFormat::Fp32)
        .map(|r| r.perplexity);
    println!(
        "{} on {} validation windows of {seq} tokens ({}):",
        path.display(),
        windows,
        crate::backend::cpu::quant::dot_isa().describe()
    );
    println!("| weights | loss | perplexity | vs fp32 |");
    println!("|---|---:|---:|---:|");
    for r in results {
        let vs = match base {
            Some(b) if r.weights != WeightFormat::Fp32 => {
                format!("{:+.2}%", 100.0 * (r.perplexity / b - 1.0))
            }
            _ => "".into(),
        };
        println!(
            "| {} | {:.4} | {:.3} | {vs} |",
            r.weights, r.loss, r.perplexity
        );
    }
    if let Some(n) = note {
        println!("({n})");
    }
}
