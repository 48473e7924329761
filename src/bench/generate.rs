//! Generation benchmark: prefill (batched forward) and decode (KV cache, one token at a time)
//! throughput, against the memory-bandwidth roofline of decoding.

use std::time::Instant;

use serde::Serialize;

use crate::backend::Kernels;
use crate::error::Result;
use crate::generate::{Decoder, KvFormat, WeightFormat};
use crate::model::timing::{BreakdownEntry, Section, StepTimings};
use crate::model::{ModelConfig, Transformer};
use crate::util::rng::Rng;

/// Results of `bench generate`.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateBench {
    pub model: String,
    pub weights: WeightFormat,
    /// How the KV cache held keys and values.
    pub kv_format: KvFormat,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub prefill_tokens_per_s: f64,
    /// The prompt's forward pass in GFLOP/s (`ModelConfig::prefill_flops`).
    pub prefill_gflops: f64,
    /// The measured peak of the prompt's products (GFLOP/s: fp32 or bf16; for int8 weights
    /// the `vpdpbusd` peak in GOP/s, where the CPU has AVX512-VNNI), and `prefill_gflops` as a
    /// fraction of it.
    pub prefill_peak_gflops: Option<f64>,
    pub prefill_fraction_of_peak: Option<f64>,
    pub decode_tokens_per_s: f64,
    pub weight_bytes_per_token: usize,
    /// Measured read bandwidth of this machine (GB/s).
    pub bandwidth_gb_s: f64,
    /// `bandwidth / weight bytes per token`: the decode speed if weights streamed at full
    /// bandwidth.
    pub roofline_tokens_per_s: f64,
    /// `decode_tokens_per_s / roofline_tokens_per_s`.
    pub roofline_fraction: f64,
    /// Bytes of the KV cache (keys and values) attention reads per decoded token, on
    /// average over the decoded tokens (it grows with the position).
    pub kv_cache_bytes_per_token: usize,
    /// `bandwidth / (weight + KV cache bytes per token)`: the roofline counting every byte a
    /// token must read, and the decode speed as a fraction of it.
    pub roofline_with_cache_tokens_per_s: f64,
    pub roofline_with_cache_fraction: f64,
    /// Where a decoded token's time goes (ms per token; `percent` of the decode time).
    pub decode_breakdown: Vec<BreakdownEntry>,
    /// Where the prompt's time goes (ms for the whole prompt; `percent` of the prefill time).
    pub prefill_breakdown: Vec<BreakdownEntry>,
    /// Several sequences decoded together (`--sequences`), when asked for.
    pub together: Option<TogetherBench>,
}

/// Decoding several sequences together (how `serve` runs concurrent requests), against one
/// sequence, measured in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct TogetherBench {
    pub sequences: usize,
    /// Tokens per second, all sequences together.
    pub tokens_per_s: f64,
    /// `tokens_per_s / decode_tokens_per_s`.
    pub ratio: f64,
}

/// The times of one prefill and decode.
#[derive(Debug, Clone)]
struct Timed {
    prefill: f64,
    prefill_timings: StepTimings,
    decode: f64,
    bytes: usize,
    decode_timings: StepTimings,
}

/// `timings` of a run of `total` seconds as a breakdown in ms per `per` (tokens), with the
/// untimed rest as "other".
fn breakdown(timings: &StepTimings, total: f64, per: usize, other: &str) -> Vec<BreakdownEntry> {
    let entry = |section: &str, label: &str, secs: f64| BreakdownEntry {
        section: section.into(),
        label: label.into(),
        ms: secs / per as f64 * 1e3,
        percent: 100.0 * secs / total,
    };
    let mut out: Vec<BreakdownEntry> = Section::ALL
        .iter()
        .filter(|&&s| timings.get(s) > 0.0)
        .map(|&s| {
            let label = if s == Section::ClassifierLoss {
                "final norm + classifier"
            } else {
                s.label()
            };
            entry(s.name(), label, timings.get(s))
        })
        .collect();
    out.push(entry(
        "other",
        &format!("other ({other})"),
        (total - timings.total()).max(0.0),
    ));
    out
}

/// What to generate.
#[derive(Debug, Clone, Copy)]
pub struct GenerateRun {
    /// Prompt tokens, prefilled in one batched pass.
    pub prompt: usize,
    /// Tokens decoded one at a time.
    pub tokens: usize,
    pub weights: WeightFormat,
    pub kv_format: KvFormat,
    /// Sequences also decoded together, one token each per pass (0 or 1: not measured).
    pub sequences: usize,
}

/// Prefills `prompt` random tokens, then decodes `tokens` more greedily, with the decoder of
/// `handgrad generate`.
pub fn run(
    kernels: &dyn Kernels,
    name: &str,
    cfg: &ModelConfig,
    r: GenerateRun,
) -> Result<GenerateBench> {
    let GenerateRun {
        prompt,
        tokens,
        weights,
        kv_format,
        sequences,
    } = r;
    let model = Transformer::new(cfg.clone());
    let params = model.layout.init(cfg.n_layers, 3);
    let mut rng = Rng::new(11);
    let ids: Vec<u32> = (0..prompt.max(1))
        .map(|_| rng.below(cfg.vocab_size as u64) as u32)
        .collect();
    let bandwidth = super::peak::read_bandwidth(1 << 30);
    let run_once = || -> Result<Timed> {
        let mut dec = Decoder::new(&model, &params, prompt + tokens + 1)?;
        dec = dec.with_weights(weights).with_kv_format(kv_format);
        let t = Instant::now();
        let mut last = argmax(dec.prefill(kernels, &ids)?);
        let prefill = t.elapsed().as_secs_f64();
        let prefill_timings = dec.timings().clone();
        dec.reset_timings();
        let t = Instant::now();
        for _ in 0..tokens {
            last = argmax(dec.step(kernels, last)?);
        }
        Ok(Timed {
            prefill,
            prefill_timings,
            decode: t.elapsed().as_secs_f64(),
            bytes: dec.weight_bytes_per_token(),
            decode_timings: dec.timings().clone(),
        })
    };
    // `sequences` prompts prefilled, then decoded together for `tokens` passes.
    let together_once = || -> Result<f64> {
        let mut dec = Decoder::new(&model, &params, 1)?
            .with_weights(weights)
            .with_kv_format(kv_format);
        let mut seqs = Vec::with_capacity(sequences);
        let mut next = Vec::with_capacity(sequences);
        for _ in 0..sequences {
            let mut s = dec.new_sequence(prompt + tokens + 1);
            next.push(argmax(dec.prefill_sequence(kernels, &mut s, &ids)?));
            seqs.push(s);
        }
        let vocab = cfg.vocab_size;
        let t = Instant::now();
        for _ in 0..tokens {
            let mut refs: Vec<&mut crate::generate::KvSequence> = seqs.iter_mut().collect();
            let logits = dec.step_batch(kernels, &mut refs, &next)?;
            for (n, row) in next.iter_mut().zip(logits.chunks(vocab)) {
                *n = argmax(row);
            }
        }
        Ok(t.elapsed().as_secs_f64())
    };
    run_once()?; // warm up
    let together = if sequences > 1 {
        together_once()?; // warm up
        Some(together_once()?)
    } else {
        None
    };

    // The median of three runs, for the prompt and the decoding apart (this machine's speed
    // varies from run to run).
    let mut runs = (0..3).map(|_| run_once()).collect::<Result<Vec<_>>>()?;
    runs.sort_by(|a, b| a.prefill.total_cmp(&b.prefill));
    let Timed {
        prefill,
        prefill_timings,
        ..
    } = runs[1].clone();
    runs.sort_by(|a, b| a.decode.total_cmp(&b.decode));
    let Timed {
        decode,
        bytes,
        decode_timings: timings,
        ..
    } = runs[1].clone();
    let decode_tps = tokens as f64 / decode;
    let decode_breakdown = breakdown(&timings, decode, tokens.max(1), "sampling, untimed");
    let prefill_breakdown = breakdown(&prefill_timings, prefill, 1, "embedding, untimed");
    let roofline = bandwidth * 1e9 / bytes as f64;
    // Decoding the token at position p reads the keys and values of positions 0..=p, of every
    // layer: on average `prompt + (tokens + 1) / 2` positions over the decoded tokens.
    let mean_positions = ids.len() as f64 + (tokens as f64 + 1.0) / 2.0;
    let per_position = 2 * cfg.n_layers * cfg.kv_dim() * kv_format.bytes();
    let cache_bytes = (per_position as f64 * mean_positions) as usize;
    let roofline_with_cache = bandwidth * 1e9 / (bytes + cache_bytes) as f64;
    Ok(GenerateBench {
        model: name.into(),
        weights,
        kv_format,
        threads: rayon::current_num_threads(),
        prompt_tokens: ids.len(),
        decode_tokens: tokens,
        prefill_tokens_per_s: ids.len() as f64 / prefill,
        prefill_gflops: cfg.prefill_flops(ids.len()) / prefill / 1e9,
        prefill_peak_gflops: None,
        prefill_fraction_of_peak: None,
        decode_tokens_per_s: decode_tps,
        weight_bytes_per_token: bytes,
        bandwidth_gb_s: bandwidth,
        roofline_tokens_per_s: roofline,
        roofline_fraction: decode_tps / roofline,
        kv_cache_bytes_per_token: cache_bytes,
        roofline_with_cache_tokens_per_s: roofline_with_cache,
        roofline_with_cache_fraction: decode_tps / roofline_with_cache,
        decode_breakdown,
        prefill_breakdown,
        together: together.map(|secs| {
            let tps = (sequences * tokens) as f64 / secs;
            TogetherBench {
                sequences,
                tokens_per_s: tps,
                ratio: tps / decode_tps,
            }
        }),
    })
}

fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in l.iter().enumerate() {
        if x > l[best] {
            best = i;
        }
    }
    best as u32
}
