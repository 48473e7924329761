//! `handgrad bench memory`.

use clap::Args;

use super::{check_seconds, pool, print_json};
use crate::bench;
use crate::bench::machine::MachineInfo;
use crate::bench::memory::MemoryResult;
use crate::error::{Error, Result};

#[derive(Args, Debug)]
pub(super) struct MemoryBenchArgs {
    /// Largest working set, e.g. 512M, 2G.
    #[arg(long, default_value = "1G")]
    max: String,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 0.05)]
    seconds: f64,
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long)]
    json: bool,
}

pub(super) fn run(a: MemoryBenchArgs) -> Result<()> {
    let max = crate::bench::machine::parse_size(&a.max.replace(['B', 'b'], ""))
        .filter(|&m| m >= 4096)
        .ok_or_else(|| {
            Error::invalid(format!(
                "--max {}: expected a size such as 64M or 1G (at least 4K)",
                a.max
            ))
        })?;
    check_seconds(a.seconds)?;
    let sizes = bench::memory::sizes(max);
    let r = pool(a.threads)?.install(|| bench::memory::sweep(&sizes, a.seconds));
    if a.json {
        return print_json("memory", &r);
    }
    print_table(&r, &MachineInfo::detect());
    Ok(())
}

fn print_table(r: &MemoryResult, m: &MachineInfo) {
    println!("{} ({} threads used)", m.cpu_model, r.threads);
    println!(
        "{:>10} {:>14} {:>16} {:>12}",
        "working set", "read GB/s (1t)", "read GB/s (all)", "latency ns"
    );
    for p in &r.points {
        println!(
            "{:>10} {:>14.1} {:>16.1} {:>12.2}",
            human(p.bytes),
            p.read_gbs_1t,
            p.read_gbs_all,
            p.latency_ns
        );
    }
    println!();
    for c in &r.cliffs {
        println!(
            "latency steps from {:.1} to {:.1} ns between {} and {}",
            c.latency_before_ns,
            c.latency_after_ns,
            human(c.below_bytes),
            human(c.above_bytes)
        );
    }
    println!(
        "the OS reports L1d {}, L2 {}, L3 {} (per core, per core, shared)",
        human(m.l1d_bytes),
        human(m.l2_bytes),
        human(m.l3_bytes)
    );
}

fn human(b: u64) -> String {
    match b {
        0 => "?".into(),
        b if b >= 1 << 30 && b.is_multiple_of(1 << 30) => format!("{} GB", b >> 30),
        b if b >= 1 << 20 => {
            format!("{:.3} MB", b as f64 / (1u64 << 20) as f64).replace(".000", "")
        }
        b => format!("{:.1} KB", b as f64 / 1024.0).replace(".0 ", " "),
    }
}
