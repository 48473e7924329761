//! `handgrad bench {train, matmul, generate}`.

use clap::{Args, Subcommand};

use crate::backend::cpu::CpuKernels;
use crate::bench;
use crate::error::{Error, Result};
use crate::model::ModelConfig;

/// Benchmarks.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Time full training steps (forward, backward, clipping, AdamW) with a per-kernel breakdown.
    Train {
        /// Model preset or config.json.
        #[arg(long, default_value = "stories110m")]
        model: String,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq: usize,
        /// Measured steps (after one warm-up step).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Matmul precision: fp32, or bf16 (fp32 master weights, optimizer and residuals).
        #[arg(long, default_value = "fp32")]
        precision: String,
        /// Worker threads (default: physical cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Time prefill and decoding (KV cache) against the memory-bandwidth roofline.
    Generate {
        #[arg(long, default_value = "stories110m")]
        model: String,
        /// Prompt tokens (prefilled in one batched forward pass).
        #[arg(long, default_value_t = 256)]
        prompt: usize,
        /// Tokens decoded one at a time.
        #[arg(long, default_value_t = 128)]
        tokens: usize,
        /// Weights streamed while decoding: fp32 or bf16.
        #[arg(long, default_value = "fp32")]
        weights: String,
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Measure the arithmetic peak (fp32 FMA, bf16 dot) and the matmul throughput of a model's shapes.
    Matmul {
        #[arg(long, default_value = "stories110m")]
        model: String,
        /// Rows (tokens) of the activations.
        #[arg(long, default_value_t = 1024)]
        rows: usize,
        /// Matmul precision: fp32 or bf16.
        #[arg(long, default_value = "fp32")]
        precision: String,
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long)]
        json: bool,
    },
}

fn pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    let t = threads.unwrap_or_else(crate::train::default_threads).max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(t)
        .build()
        .map_err(|e| Error::invalid(format!("cannot start {t} threads: {e}")))
}

fn json(v: &impl serde::Serialize) -> Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| Error::json("writing results", e))?
    );
    Ok(())
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.command {
        BenchCommand::Train {
            model,
            batch,
            seq,
            steps,
            precision,
            threads,
            json: as_json,
        } => {
            let cfg = ModelConfig::from_preset_or_path(&model)?;
            if seq > cfg.max_seq_len {
                return Err(Error::invalid(format!(
                    "--seq {seq} exceeds the model's {} positions",
                    cfg.max_seq_len
                )));
            }
            if batch == 0 || seq == 0 || steps == 0 {
                return Err(Error::invalid(
                    "--batch, --seq and --steps must be at least 1",
                ));
            }
            let kernels = crate::backend::kernels_for(&precision)?;
            let r = pool(threads)?.install(|| {
                // Measured before and after the steps; the higher value counts (a shared host
                // can steal a core during one measurement).
                let measure_peak = || {
                    if precision == "bf16" {
                        bench::peak::bf16_peak(0.5).unwrap_or(f64::NAN)
                    } else {
                        bench::peak::fp32_peak(0.5).0
                    }
                };
                let before = measure_peak();
                let mut r = bench::train::run(
                    kernels.as_ref(),
                    &model,
                    &cfg,
                    batch,
                    seq,
                    steps,
                    &precision,
                    before,
                )?;
                let peak = before.max(measure_peak());
                r.peak_gflops = peak;
                r.mfu = r.gflops / peak;
                Ok::<_, Error>(r)
            })?;
            if as_json {
                return json(&r);
            }
            println!(
                "{}: {} parameters, batch {} x seq {}, {}, {} threads, {} steps",
                r.model,
                crate::model::config::human_count(r.params),
                r.batch,
                r.seq,
                r.precision,
                r.threads,
                r.steps
            );
            println!(
                "step: median {:.1} ms (min {:.1}, max {:.1}) | {:.0} tokens/s | {:.1} GFLOP/s | MFU {:.1}% of the measured {} peak {:.1} GFLOP/s",
                r.median_ms,
                r.min_ms,
                r.max_ms,
                r.tokens_per_s,
                r.gflops,
                100.0 * r.mfu,
                r.precision,
                r.peak_gflops
            );
            println!(
                "FLOPs/step {:.1} G = {}",
                r.flops_per_step / 1e9,
                r.flop_formula
            );
            if let Some(b) = r.peak_rss_bytes {
                println!("peak RSS {:.2} GB", b as f64 / 1e9);
            }
            println!(
                "\n{:34} {:>10} {:>7}",
                "breakdown (mean per step)", "ms", "%"
            );
            for e in &r.breakdown {
                println!("{:34} {:>10.1} {:>6.1}%", e.section, e.ms, e.percent);
            }
            Ok(())
        }
        BenchCommand::Generate {
            model,
            prompt,
            tokens,
            weights,
            threads,
            json: as_json,
        } => {
            let cfg = ModelConfig::from_preset_or_path(&model)?;
            let bf16 = match weights.as_str() {
                "fp32" | "f32" => false,
                "bf16" => true,
                other => {
                    return Err(Error::invalid(format!(
                        "unknown --weights '{other}' (fp32 or bf16)"
                    )));
                }
            };
            if prompt + tokens + 1 > cfg.max_seq_len {
                return Err(Error::invalid(format!(
                    "--prompt + --tokens exceed the model's {} positions",
                    cfg.max_seq_len
                )));
            }
            let r = pool(threads)?.install(|| {
                bench::generate::run(&CpuKernels, &model, &cfg, prompt, tokens, bf16)
            })?;
            if as_json {
                return json(&r);
            }
            println!("{}: {} weights, {} threads", r.model, r.weights, r.threads);
            println!(
                "prefill {} tokens: {:.0} tokens/s",
                r.prompt_tokens, r.prefill_tokens_per_s
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
                "prefill / decode speed: {:.1}x",
                r.prefill_tokens_per_s / r.decode_tokens_per_s
            );
            Ok(())
        }
        BenchCommand::Matmul {
            model,
            rows,
            precision,
            threads,
            json: as_json,
        } => {
            let cfg = ModelConfig::from_preset_or_path(&model)?;
            let kernels = crate::backend::kernels_for(&precision)?;
            let (peak, isa, bf16, results) = pool(threads)?.install(|| {
                let (peak, isa) = bench::peak::fp32_peak(1.0);
                let bf16 = bench::peak::bf16_peak(1.0);
                (
                    peak,
                    isa,
                    bf16,
                    bench::matmul::run(kernels.as_ref(), &cfg, rows, 3),
                )
            });
            if as_json {
                return json(&serde_json::json!({
                    "fp32_peak_gflops": peak, "fp32_isa": isa, "bf16_peak_gflops": bf16, "matmuls": results
                }));
            }
            println!("fp32 FMA peak ({isa}): {peak:.1} GFLOP/s");
            match bf16 {
                Some(b) => println!("bf16 dot peak (vdpbf16ps): {b:.1} GFLOP/s"),
                None => println!("bf16 dot peak: no AVX512_BF16 on this CPU"),
            }
            println!(
                "\n{:28} {:6} {:>19} {:>9} {:>9} {:>7}",
                "weight", "pass", "m x k x n", "ms", "GFLOP/s", "% peak"
            );
            for r in &results {
                println!(
                    "{:28} {:6} {:>5}x{:>6}x{:>6} {:>9.2} {:>9.1} {:>6.1}%",
                    r.weight,
                    r.pass,
                    r.m,
                    r.k,
                    r.n,
                    r.ms,
                    r.gflops,
                    100.0 * r.gflops / peak
                );
            }
            Ok(())
        }
    }
}
