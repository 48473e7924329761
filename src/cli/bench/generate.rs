//! `handgrad bench generate`.

use clap::Args;

use super::{measure_peak, pool, print_json};
use crate::backend::{Backend, Precision};
use crate::bench;
use crate::bench::generate::{GenerateBench, GenerateRun};
use crate::cli::backend_args::BackendArgs;
use crate::error::{Error, Result};
use crate::generate::{KvFormat, WeightFormat};
use crate::model::ModelConfig;

#[derive(Args, Debug)]
pub(super) struct GenerateBenchArgs {
    #[arg(long, default_value = "stories110m")]
    model: String,
    /// Prompt tokens, prefilled in one batched forward pass [default: 256, or half the
    /// model's positions when it has fewer than 512].
    #[arg(long)]
    prompt: Option<usize>,
    /// Tokens decoded one at a time [default: 128, or what the model's positions leave after
    /// the prompt].
    #[arg(long)]
    tokens: Option<usize>,
    /// Weights streamed while decoding: fp32, bf16 or q8 (int8, CPU backend only).
    #[arg(long, value_enum, default_value_t = WeightFormat::Fp32)]
    weights: WeightFormat,
    /// How the KV cache holds keys and values: f32, or bf16 (half the bytes per cached
    /// position) [default: f32 with fp32 weights, bf16 with bf16 or q8 weights].
    #[arg(long, value_enum)]
    kv_cache: Option<KvFormat>,
    /// Also decode this many sequences together (one token each per pass, as `serve` runs
    /// concurrent requests) and report their total tokens/s against one sequence's.
    #[arg(long, default_value_t = 1)]
    sequences: usize,
    /// Backend and precision of the prompt's batched pass [default precision: bf16 with
    /// --weights bf16 on CPUs with AVX512_BF16, else fp32].
    #[command(flatten)]
    backend: BackendArgs,
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long)]
    json: bool,
}

/// The prompt and decode lengths: as given, else what fits the model's positions.
fn lengths(a: &GenerateBenchArgs, cfg: &ModelConfig) -> Result<(usize, usize)> {
    // Defaults that fit the model: the prompt takes at most half of its positions.
    let prompt = a.prompt.unwrap_or(256.min(cfg.max_seq_len / 2));
    let tokens = a
        .tokens
        .unwrap_or(128.min(cfg.max_seq_len.saturating_sub(prompt + 1)));
    if prompt + tokens + 1 > cfg.max_seq_len {
        return Err(Error::invalid(format!(
            "--prompt {prompt} + --tokens {tokens} (+1) exceed the model's {} positions",
            cfg.max_seq_len
        )));
    }
    Ok((prompt, tokens))
}

pub(super) fn run(a: GenerateBenchArgs) -> Result<()> {
    let cfg = ModelConfig::from_preset_or_path(&a.model)?;
    let (prompt, tokens) = lengths(&a, &cfg)?;
    let default_precision =
        if a.weights == WeightFormat::Bf16 && crate::backend::cpu::bf16_in_hardware() {
            Precision::Bf16
        } else {
            Precision::Fp32
        };
    let backend: Backend = a.backend.resolve_with(default_precision);
    let mut kernels = backend.kernels()?;
    a.weights.check_kernels(kernels.as_ref(), backend.kind)?;
    kernels.prepare(&crate::model::Transformer::new(cfg.clone()).step_shape(1, prompt))?;
    let run = GenerateRun {
        prompt,
        tokens,
        weights: a.weights,
        kv_format: a
            .kv_cache
            .unwrap_or_else(|| KvFormat::default_for(a.weights)),
        sequences: a.sequences,
    };
    let r = pool(a.threads)?.install(|| -> Result<_> {
        let mut r = bench::generate::run(kernels.as_ref(), &a.model, &cfg, run)?;
        // The prompt's products run in the backend's precision, or in int8 with q8 weights.
        if kernels.products_on_cpu() {
            let peak = if a.weights == WeightFormat::Q8 {
                crate::bench::peak::int8_peak(0.5).unwrap_or(f64::NAN)
            } else {
                measure_peak(backend.precision, 0.5)
            };
            if peak.is_finite() && peak > 0.0 {
                r.prefill_peak_gflops = Some(peak);
                r.prefill_fraction_of_peak = Some(r.prefill_gflops / peak);
            }
        }
        Ok(r)
    })?;
    if a.json {
        return print_json("generate", &r);
    }
    print_summary(&r, &backend);
    if let Some(t) = &r.together {
        println!(
            "decode {} sequences together: {:.1} tokens/s in all, {:.2}x one sequence",
            t.sequences, t.tokens_per_s, t.ratio
        );
    }
    print_breakdown(&r);
    Ok(())
}

fn print_summary(r: &GenerateBench, backend: &Backend) {
    println!(
        "{}: {} weights, prompt on {backend}, {} threads",
        r.model, r.weights, r.threads
    );
    let of_peak = match (r.prefill_fraction_of_peak, r.prefill_peak_gflops) {
        (Some(f), Some(p)) if r.weights == WeightFormat::Q8 => format!(
            " = {:.1}% of the measured int8 (vpdpbusd) peak {p:.1} GOP/s",
            100.0 * f
        ),
        (Some(f), Some(p)) => format!(
            " = {:.1}% of the measured {} peak {p:.1} GFLOP/s",
            100.0 * f,
            backend.precision
        ),
        _ => String::new(),
    };
    println!(
        "prefill {} tokens: {:.0} tokens/s, {:.1} GFLOP/s{of_peak}",
        r.prompt_tokens, r.prefill_tokens_per_s, r.prefill_gflops
    );
    println!(
        "decode {} tokens: {:.1} tokens/s ({:.1}% of the roofline {:.1} tokens/s = {:.1} GB/s measured read bandwidth / {:.1} MB of weights per token)",
        r.decode_tokens,
        r.decode_tokens_per_s,
        100.0 * r.roofline_fraction,
        r.roofline_tokens_per_s,
        r.bandwidth_gb_s,
        r.weight_bytes_per_token as f64 / 1e6
    );
    println!(
        "  counting the KV cache too ({:.1} MB of {} keys and values per token on average): {:.1}% of {:.1} tokens/s",
        r.kv_cache_bytes_per_token as f64 / 1e6,
        r.kv_format,
        100.0 * r.roofline_with_cache_fraction,
        r.roofline_with_cache_tokens_per_s
    );
    println!(
        "prefill / decode speed: {:.1}x",
        r.prefill_tokens_per_s / r.decode_tokens_per_s
    );
}

fn print_breakdown(r: &GenerateBench) {
    let table = |title: &str, entries: &[crate::model::timing::BreakdownEntry]| {
        println!("\n{:16} {:38} {:>10} {:>7}", "breakdown", title, "ms", "%");
        for e in entries {
            println!(
                "{:16} {:38} {:>10.2} {:>6.1}%",
                e.section, e.label, e.ms, e.percent
            );
        }
    };
    table(
        &format!("(the prompt of {} tokens)", r.prompt_tokens),
        &r.prefill_breakdown,
    );
    table("(mean per decoded token)", &r.decode_breakdown);
}
