//! `handgrad bench {train, generate, matmul, memory, latency, report}`: the arguments of each
//! benchmark, running it and printing its table (or its JSON result with `--json`). The
//! measurements themselves are in [`crate::bench`].

mod generate;
mod latency;
mod matmul;
mod memory;
mod report;
mod train;

use clap::{Args, Subcommand};

use crate::backend::Precision;
use crate::bench;
use crate::error::{Error, Result};

use super::thread_pool as pool;

/// Benchmarks.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Time the trainer's training step (forward, backward, clipping, AdamW) with a per-block
    /// time breakdown.
    Train(train::TrainBenchArgs),
    /// Time prefill and decoding (KV cache) against the memory-bandwidth roofline.
    Generate(generate::GenerateBenchArgs),
    /// Measure the arithmetic peak (fp32 FMA, bf16 dot) and the matmul throughput of a model's
    /// shapes.
    Matmul(matmul::MatmulBenchArgs),
    /// Read bandwidth (one thread and all) and load latency against working-set size, with the
    /// cache-level cliffs found and the sizes the OS reports.
    Memory(memory::MemoryBenchArgs),
    /// Per-call latency of the kernels at tiny sizes, per backend (cpu fp32 and bf16, ane-sim,
    /// ane where available).
    Latency(latency::LatencyBenchArgs),
    /// Merge result files (`bench ... --json`, `ane probe -o`) from many machines into one
    /// Markdown report; files that fail validation are left out with the reason.
    Report(report::ReportArgs),
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.command {
        BenchCommand::Train(a) => train::run(a),
        BenchCommand::Generate(a) => generate::run(a),
        BenchCommand::Matmul(a) => matmul::run(a),
        BenchCommand::Memory(a) => memory::run(a),
        BenchCommand::Report(a) => report::run(a),
        BenchCommand::Latency(a) => latency::run(a),
    }
}

/// Prints a result in the benchmark envelope (schema, machine, date).
fn print_json(bench: &str, v: &impl serde::Serialize) -> Result<()> {
    let e = crate::bench::machine::Envelope::new(bench, v);
    println!(
        "{}",
        serde_json::to_string_pretty(&e).map_err(|e| Error::json("writing results", e))?
    );
    Ok(())
}

/// `--seconds` must be a positive, finite number.
fn check_seconds(seconds: f64) -> Result<()> {
    if !(seconds > 0.0 && seconds.is_finite()) {
        return Err(Error::invalid("--seconds must be positive"));
    }
    Ok(())
}

/// The measured arithmetic peak of a precision (GFLOP/s); NaN where it cannot run.
fn measure_peak(precision: Precision, seconds: f64) -> f64 {
    match precision {
        Precision::Bf16 => bench::peak::bf16_peak(seconds).unwrap_or(f64::NAN),
        // The CPU's share of an fp16 (Neural Engine) step runs in fp32.
        Precision::Fp32 | Precision::Fp16 => bench::peak::fp32_peak(seconds).0,
    }
}
