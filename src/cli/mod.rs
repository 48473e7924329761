//! The `handgrad` command line.

mod ane;
mod backend_args;
mod bench;
mod convert;
mod dashboard;
mod data;
mod eval;
mod generate;
mod info;
mod plot;
mod prepare;
mod serve;
mod tokenizer;
mod train;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::error::Result;

/// Train and run small transformer language models (Llama-2 and Qwen3 families) with
/// hand-written forward and backward passes, on the CPU.
#[derive(Parser, Debug)]
#[command(name = "handgrad", version, about, long_about = None, propagate_version = true, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model. With no arguments: the default small model on the built-in stories,
    /// a few minutes on two cores, ending with a generated sample.
    Train(Box<train::TrainArgs>),
    /// Show a training run in the terminal: loss curves, throughput, time per block, memory,
    /// power, samples (follows a live run's events.jsonl).
    Dashboard(dashboard::DashboardArgs),
    /// Generate text from a trained model (a run folder or a checkpoint file).
    Generate(generate::GenerateArgs),
    /// Validation perplexity of a model with its weights in fp32, bf16 and int8 (q8).
    Eval(eval::EvalArgs),
    /// Draw runs' loss, learning rate and throughput as a PNG (several runs overlaid).
    Plot(plot::PlotArgs),
    /// Print a model's shapes and parameter counts, or describe a file.
    Info(info::InfoArgs),
    /// Train, or encode and decode with, a tokenizer.
    Tokenizer(tokenizer::TokenizerArgs),
    /// Benchmark training steps, matmuls and generation on this machine.
    Bench(bench::BenchArgs),
    /// Apple Neural Engine programs: emit the ten kernels of a model as MIL, check MIL files.
    Ane(ane::AneArgs),
    /// Download datasets (TinyStories).
    Data(data::DataArgs),
    /// Tokenize text corpora into token shards for training.
    Prepare(prepare::PrepareArgs),
    /// Serve a model over the OpenAI HTTP API (completions and chat, streaming, concurrent
    /// requests decoded together), for any OpenAI client.
    Serve(serve::ServeArgs),
    /// Convert a model between formats (Hugging Face, llama2.c, GGUF in; Hugging Face,
    /// llama2.c, GGUF out).
    ///
    /// A .gguf output runs in llama.cpp, Ollama and LM Studio, tokenizer and chat template
    /// included: `handgrad convert runs/my-run model.gguf --dtype q8_0`, then
    /// `llama-completion -m model.gguf -no-cnv -p "Once upon a time"` or an Ollama Modelfile
    /// `FROM ./model.gguf`.
    Convert(convert::ConvertArgs),
}

/// Parses the command line and runs the command; returns the process exit code.
pub fn main() -> i32 {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // Commands that print and exit stop quietly when their reader goes away (`| head`), as
    // Unix tools do. `train` keeps training (its console is detached) and `generate` stops
    // generating: both handle a closed stream themselves. `serve` writes to sockets, whose
    // clients may go away at any time.
    if !matches!(
        cli.command,
        Command::Train(_) | Command::Generate(_) | Command::Dashboard(_) | Command::Serve(_)
    ) {
        default_sigpipe();
    }
    let result: Result<()> = match cli.command {
        Command::Train(a) => {
            let given = matches
                .subcommand_matches("train")
                .map(given_flags)
                .unwrap_or_default();
            train::run(*a, given)
        }
        Command::Generate(a) => generate::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Dashboard(a) => dashboard::run(a),
        Command::Info(a) => info::run(a),
        Command::Plot(a) => plot::run(a),
        Command::Tokenizer(a) => tokenizer::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Prepare(a) => prepare::run(a),
        Command::Data(a) => data::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Ane(a) => ane::run(a),
    };
    match result {
        Ok(()) => 0,
        Err(crate::Error::Interrupted) => 130,
        Err(e) => {
            say(&format!("error: {}", one_line(&e)));
            1
        }
    }
}

/// A line on stderr, which may be closed (then nothing is said).
pub(crate) fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Restores the default action of SIGPIPE (Rust ignores it, which turns a closed pipe into a
/// panic at the next `println!`): the process ends quietly instead.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal's action to the default has no preconditions; no handler runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The names of the options given on the command line (not defaults), e.g. `min_lr_ratio`.
fn given_flags(m: &clap::ArgMatches) -> crate::train::GivenFlags {
    crate::train::GivenFlags::new(
        m.ids()
            .filter(|id| {
                m.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
            })
            .map(|id| id.as_str().to_string()),
    )
}

/// A pool of `threads` workers (default: the physical cores).
pub(crate) fn thread_pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    let t = threads.unwrap_or_else(crate::train::default_threads).max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(t)
        .build()
        .map_err(|e| crate::Error::invalid(format!("cannot start {t} threads: {e}")))
}

/// An error and its causes on one line.
pub(crate) fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    s.replace('\n', " ")
}
