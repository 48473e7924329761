//! `handgrad bench latency`.

use clap::{Args, ValueEnum};

use super::{check_seconds, pool, print_json};
use crate::backend::{Backend, BackendKind, Precision};
use crate::bench;
use crate::bench::latency::BackendLatency;
use crate::error::Result;

#[derive(Args, Debug)]
pub(super) struct LatencyBenchArgs {
    /// Backends to time, comma-separated: cpu (fp32), cpu-bf16, ane-sim, ane.
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = parse_backend,
        default_value = "cpu,cpu-bf16,ane-sim,ane"
    )]
    backends: Vec<LatencyBackend>,
    /// Seconds spent on each operation.
    #[arg(long, default_value_t = 0.2)]
    seconds: f64,
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long)]
    json: bool,
}

/// A backend of `--backends`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum LatencyBackend {
    #[value(name = "cpu", alias = "cpu-fp32")]
    Cpu,
    #[value(name = "cpu-bf16")]
    CpuBf16,
    #[value(name = "ane-sim")]
    AneSim,
    #[value(name = "ane")]
    Ane,
}

impl LatencyBackend {
    /// The backend and precision it times.
    fn backend(self) -> Backend {
        match self {
            LatencyBackend::Cpu => Backend::cpu(Precision::Fp32),
            LatencyBackend::CpuBf16 => Backend::cpu(Precision::Bf16),
            LatencyBackend::AneSim => Backend {
                kind: BackendKind::AneSim,
                precision: Precision::Fp32,
            },
            LatencyBackend::Ane => Backend {
                kind: BackendKind::Ane,
                precision: Precision::Fp32,
            },
        }
    }
}

/// One name of `--backends` (spaces around it allowed).
fn parse_backend(s: &str) -> std::result::Result<LatencyBackend, String> {
    let name = s.trim();
    LatencyBackend::from_str(name, false)
        .map_err(|_| format!("unknown '{name}' (cpu, cpu-bf16, ane-sim, ane)"))
}

pub(super) fn run(a: LatencyBenchArgs) -> Result<()> {
    check_seconds(a.seconds)?;
    let results: Vec<_> = pool(a.threads)?.install(|| {
        a.backends
            .iter()
            .map(|b| bench::latency::measure(b.backend(), a.seconds))
            .collect()
    });
    if a.json {
        return print_json("latency", &serde_json::json!({ "backends": results }));
    }
    print_table(&results);
    Ok(())
}

fn print_table(results: &[BackendLatency]) {
    println!(
        "{:14} {:16} {:34} {:>12} {:>12} {:>8}",
        "backend", "op", "size", "median us", "fastest us", "calls"
    );
    for r in results {
        if let Some(why) = &r.unavailable {
            println!("{:14} not available: {why}", r.backend);
            continue;
        }
        for p in &r.points {
            println!(
                "{:14} {:16} {:34} {:>12.2} {:>12.2} {:>8}",
                r.backend,
                p.op,
                p.shape,
                p.median_ns / 1e3,
                p.min_ns / 1e3,
                p.calls
            );
        }
    }
}
