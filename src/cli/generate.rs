//! `handgrad generate`.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;

use super::backend_args::BackendArgs;
use crate::backend::Precision;
use crate::data::chat::{ChatTemplate, Message};
use crate::error::{Error, Result};
use crate::formats::load_model_with_adapter;
use crate::generate::{GenerateOptions, KvFormat, Sampling, StopReason, WeightFormat, generate};
use crate::model::Transformer;
use crate::tokenizer;

/// Which model to load: a run folder, a checkpoint, or a model file, with an optional
/// adapter and tokenizer (shared by `generate` and `serve`).
#[derive(Args, Debug, Clone)]
pub struct ModelSource {
    /// A run folder: uses its checkpoints/latest (or best with --best).
    #[arg(long, conflicts_with = "checkpoint")]
    pub run_dir: Option<PathBuf>,
    /// A checkpoint file.
    #[arg(long, conflicts_with = "model")]
    pub checkpoint: Option<PathBuf>,
    /// A model in any supported format: Hugging Face folder or .safetensors, llama2.c .bin,
    /// GGUF, or handgrad checkpoint.
    #[arg(long, conflicts_with = "run_dir")]
    pub model: Option<PathBuf>,
    /// Use checkpoints/best (lowest validation loss) instead of latest.
    #[arg(long)]
    pub best: bool,
    /// A PEFT LoRA adapter folder (a LoRA run's adapter/, or one PEFT saved) to merge into
    /// the model's weights before generating.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Tokenizer file, overriding the one stored in the checkpoint.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// Options of `handgrad generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    source: ModelSource,
    /// Text to continue (with --chat: the user's message).
    #[arg(long, default_value = "Once upon a time")]
    prompt: String,
    /// Chat: the prompt is a user message, rendered with the model's chat template (its
    /// tokenizer_config.json, a chat run's folder, or --chat-template); prints the assistant's
    /// reply, which ends at the template's end of turn.
    #[arg(long)]
    chat: bool,
    /// With --chat: a system message before the user's.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// With --chat: the chat template (a Jinja file) instead of the model's.
    #[arg(long, requires = "chat", value_name = "FILE")]
    chat_template: Option<PathBuf>,
    /// Tokens to generate at most (stops earlier at end of text or the context limit).
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 picks the most likely token every time.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample among the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// Sample from the smallest set of tokens with this much probability (1: all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler (the same seed gives the same text).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Weights streamed per generated token: fp32; bf16 (half the memory traffic, so about
    /// twice as fast on memory-bound machines; products still accumulate in f32); or q8 (int8
    /// in groups of 64 with f32 scales, as llama2.c's runq.c: about a quarter of the traffic,
    /// int8 activations too, used for the prompt as well; CPU backend only).
    #[arg(long, value_enum, default_value_t = WeightFormat::Fp32)]
    weights: WeightFormat,
    /// How the KV cache holds keys and values: f32, or bf16 (half the bytes each generated
    /// token reads from it; keys and values rounded to 8 significant bits) [default: f32 with
    /// --weights fp32, bf16 with bf16 or q8].
    #[arg(long, value_enum)]
    kv_cache: Option<KvFormat>,
    /// Backend and precision of the prompt's batched pass [default precision: bf16 with
    /// --weights bf16 on CPUs with AVX512_BF16, else fp32].
    #[command(flatten)]
    backend: BackendArgs,
    /// Worker threads (default: physical cores).
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let sampling = Sampling::from_settings(a.temperature, a.top_k, a.top_p)?;
    let (model, params, tok, source) = load(&a.source)?;
    let pool = super::thread_pool(a.threads)?;
    let mut opts = GenerateOptions {
        stop_ids: Vec::new(),
        prompt: a.prompt.clone(),
        max_tokens: a.max_tokens,
        sampling,
        seed: a.seed,
        add_bos: true,
        weights: a.weights,
        kv_cache: a
            .kv_cache
            .unwrap_or_else(|| KvFormat::default_for(a.weights)),
    };
    if a.chat {
        let template = chat_template(&a.source, a.chat_template.as_deref(), &source)?;
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(Message::new("system", s.as_str()));
        }
        messages.push(Message::new("user", a.prompt.as_str()));
        opts.prompt = template.render(&messages, true)?;
        opts.add_bos = false;
        opts.stop_ids = template.stop_ids(tok.as_ref())?;
    }
    let kernels = decoding_kernels(
        &a.backend,
        a.weights,
        &model,
        model.cfg.max_seq_len.min(a.max_tokens + 1),
    )?;
    // The text streams to stdout; when its reader goes away (`| head`), generation stops
    // quietly.
    let mut out = std::io::stdout();
    let mut write = |s: &str| out.write_all(s.as_bytes()).and_then(|()| out.flush());
    if !a.chat && write(&a.prompt).is_err() {
        return Ok(());
    }
    let t0 = std::time::Instant::now();
    let g = pool.install(|| {
        generate(
            &model,
            &params,
            kernels.as_ref(),
            tok.as_ref(),
            &opts,
            &mut |s: &str| match write(s) {
                Ok(()) => std::ops::ControlFlow::Continue(()),
                Err(_) => std::ops::ControlFlow::Break(()),
            },
        )
    })?;
    if g.stop == StopReason::Stopped || write("\n").is_err() {
        return Ok(());
    }
    summarize(&g, opts.kv_cache, t0.elapsed().as_secs_f64());
    Ok(())
}

/// The kernels that decode with `weights` (shared by `generate` and `serve`): the backend
/// asked for, bf16 products by default with bf16 weights on CPUs with AVX512_BF16, prepared
/// for prompts of up to `positions` tokens; its warnings printed.
pub fn decoding_kernels(
    backend: &BackendArgs,
    weights: WeightFormat,
    model: &Transformer,
    positions: usize,
) -> Result<Box<dyn crate::backend::Kernels>> {
    let default_precision =
        if weights == WeightFormat::Bf16 && crate::backend::cpu::bf16_in_hardware() {
            Precision::Bf16
        } else {
            Precision::Fp32
        };
    let backend = backend.resolve_with(default_precision);
    for w in backend.warnings() {
        eprintln!("warning: {w}");
    }
    let mut kernels = backend.kernels()?;
    weights.check_kernels(kernels.as_ref(), backend.kind)?;
    kernels.prepare(&model.step_shape(1, positions))?;
    Ok(kernels)
}

/// The chat template for `--chat`: `--chat-template`, else the one in the model's folder (a
/// Hugging Face folder's tokenizer_config.json, or the run folder of a chat run).
pub fn chat_template(
    a: &ModelSource,
    template_file: Option<&Path>,
    source: &Path,
) -> Result<ChatTemplate> {
    let dir = match &a.run_dir {
        Some(d) => d.clone(),
        None if source.is_dir() => source.to_path_buf(),
        // A checkpoint in a run's checkpoints/ folder: the run folder.
        None => source
            .parent()
            .and_then(|p| {
                if p.ends_with("checkpoints") {
                    p.parent()
                } else {
                    Some(p)
                }
            })
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
    };
    ChatTemplate::load(template_file, &dir)
}

/// The model, its parameters, the tokenizer the flags name, and the path the model came from.
pub type Loaded = (
    Transformer,
    Vec<f32>,
    Box<dyn tokenizer::Tokenizer>,
    PathBuf,
);

pub fn load(a: &ModelSource) -> Result<Loaded> {
    let path = match (&a.run_dir, &a.checkpoint, &a.model) {
        (Some(dir), None, None) => crate::run::RunDir::existing(dir)?.checkpoint_to_read(a.best)?,
        (None, Some(p), None) | (None, None, Some(p)) => p.clone(),
        _ => {
            return Err(Error::invalid(
                "give one of --run-dir, --checkpoint or --model",
            ));
        }
    };
    let loaded = load_model_with_adapter(&path, a.adapter.as_deref())?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let tok = match (&a.tokenizer, &loaded.tokenizer) {
        (Some(p), _) => tokenizer::load(p)?,
        (None, Some(t)) => t.load(&path)?,
        (None, None) => {
            return Err(Error::invalid(format!(
                "{} comes without a tokenizer; pass --tokenizer (tokenizer.json or tokenizer.bin)",
                path.display()
            )));
        }
    };
    if tok.vocab_size() > loaded.cfg.vocab_size {
        return Err(Error::invalid(format!(
            "the tokenizer has {} ids but the model only {}",
            tok.vocab_size(),
            loaded.cfg.vocab_size
        )));
    }
    let model = loaded.transformer();
    Ok((model, loaded.params, tok, path))
}

/// One line on stderr: token counts, speeds, the weights read, why it stopped.
fn summarize(g: &crate::generate::Generation, kv_cache: KvFormat, secs: f64) {
    let why = match g.stop {
        StopReason::EndOfSequence => "end of text",
        StopReason::MaxTokens => "--max-tokens reached",
        StopReason::ContextFull => "context full",
        StopReason::Stopped => "stopped",
    };
    let decode_rate = g.ids.len() as f64 / g.decode_seconds.max(1e-9);
    eprintln!(
        "[{} prompt + {} generated tokens in {secs:.2}s: prompt {:.0} tok/s, decode {decode_rate:.1} tok/s with {} weights ({:.1} MB read per token), {kv_cache} KV cache; stopped: {why}]",
        g.prompt_ids.len(),
        g.ids.len(),
        g.prompt_ids.len() as f64 / g.prefill_seconds.max(1e-9),
        g.weights,
        g.weight_bytes_per_token as f64 / 1e6,
    );
}
