//! Text generation: a KV-cache decoder, samplers, and a streaming generation loop.

pub mod decoder;
pub mod sampler;
pub mod text;

pub use decoder::{Decoder, KvFormat, KvSequence, WeightFormat};
pub use sampler::{Sampler, Sampling};
pub use text::TextStream;

use crate::backend::Kernels;
use crate::error::Result;
use crate::model::Transformer;
use crate::tokenizer::Tokenizer;
use std::ops::ControlFlow;

/// Settings of one generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub prompt: String,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub seed: u64,
    /// Prepend the tokenizer's BOS id when it has one.
    pub add_bos: bool,
    /// The weights read per decoded token (bf16: half the memory traffic).
    pub weights: WeightFormat,
    /// How the KV cache holds keys and values ([`KvFormat::default_for`] the weights unless
    /// the user chose).
    pub kv_cache: KvFormat,
    /// Token ids that end the generation besides the tokenizer's end of text (a chat
    /// template's end of turn).
    pub stop_ids: Vec<u32>,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    EndOfSequence,
    MaxTokens,
    ContextFull,
    /// The caller's `on_text` asked to stop (e.g. the reader of stdout went away).
    Stopped,
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub ids: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    /// The weights the decoder read per token, and how many bytes of them.
    pub weights: WeightFormat,
    pub weight_bytes_per_token: usize,
    /// Seconds spent on the prompt (one batched pass) and on the generated tokens.
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// The ids a generation starts from: BOS (when `add_bos` and the tokenizer has one), then
/// the prompt's tokens; the end-of-text id when both are missing.
pub fn encode_prompt(tokenizer: &dyn Tokenizer, prompt: &str, add_bos: bool) -> Result<Vec<u32>> {
    let mut prompt_ids = Vec::new();
    if add_bos && let Some(b) = tokenizer.bos_id() {
        prompt_ids.push(b);
    }
    prompt_ids.extend(tokenizer.encode(prompt)?);
    if prompt_ids.is_empty() {
        // Start from the document separator when there is neither prompt nor BOS.
        if let Some(e) = tokenizer.eos_id() {
            prompt_ids.push(e);
        }
    }
    Ok(prompt_ids)
}

/// Generates a continuation of `opts.prompt`, calling `on_text` with each new piece of text as
/// soon as it decodes to complete characters; `on_text` returning `Break` stops the generation
/// there ([`StopReason::Stopped`]).
pub fn generate(
    model: &Transformer,
    params: &[f32],
    kernels: &dyn Kernels,
    tokenizer: &dyn Tokenizer,
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
) -> Result<Generation> {
    let prompt_ids = encode_prompt(tokenizer, &opts.prompt, opts.add_bos)?;
    // The cache only needs room for this generation (a 40k-position cache of a large model
    // would take gigabytes).
    let capacity = (prompt_ids.len() + opts.max_tokens).min(model.cfg.max_seq_len);
    let mut dec = Decoder::new(model, params, capacity)?;
    let mut sampler = Sampler::new(opts.sampling, opts.seed);
    let mut logits = Vec::new();
    if prompt_ids.len() > dec.capacity() {
        return Err(crate::Error::invalid(format!(
            "the prompt has {} tokens, more than the model's context of {}",
            prompt_ids.len(),
            dec.capacity()
        )));
    }
    dec = dec.with_weights(opts.weights).with_kv_format(opts.kv_cache);
    let t_prefill = std::time::Instant::now();
    logits.extend_from_slice(dec.prefill(kernels, &prompt_ids)?);
    let prefill_seconds = t_prefill.elapsed().as_secs_f64();
    let t_decode = std::time::Instant::now();
    let mut stop_ids = tokenizer.stop_ids();
    stop_ids.extend_from_slice(&opts.stop_ids);
    let mut text = TextStream::new(tokenizer, &prompt_ids)?;
    let mut stop = StopReason::MaxTokens;
    for _ in 0..opts.max_tokens {
        let next = sampler.sample(&logits);
        if stop_ids.contains(&next) {
            stop = StopReason::EndOfSequence;
            break;
        }
        if let Some(piece) = text.push(next)?
            && on_text(&piece).is_break()
        {
            stop = StopReason::Stopped;
            break;
        }
        if text.ids().len() == opts.max_tokens {
            break;
        }
        if dec.position() >= dec.capacity() {
            stop = StopReason::ContextFull;
            break;
        }
        logits.copy_from_slice(dec.step(kernels, next)?);
    }
    if stop != StopReason::Stopped
        && let Some(piece) = text.finish()?
    {
        let _ = on_text(&piece);
    }
    let ids = text.ids().to_vec();
    let text = text.text()?;
    Ok(Generation {
        prompt_ids,
        ids,
        text,
        stop,
        weights: dec.weight_format(),
        weight_bytes_per_token: dec.weight_bytes_per_token(),
        prefill_seconds,
        decode_seconds: t_decode.elapsed().as_secs_f64(),
    })
}
