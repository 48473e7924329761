//! `handgrad bench matmul`: one run on the chosen backend, or a sweep of thread counts and
//! precisions.

use clap::Args;
use serde::Serialize;

use super::{pool, print_json};
use crate::backend::{Backend, Precision};
use crate::bench;
use crate::bench::matmul::MatmulResult;
use crate::bench::peak::TheoreticalPeak;
use crate::cli::backend_args::BackendArgs;
use crate::error::{Error, Result};
use crate::model::ModelConfig;

#[derive(Args, Debug)]
pub(super) struct MatmulBenchArgs {
    #[arg(long, default_value = "stories110m")]
    model: String,
    /// Sweep thread counts 1..N and every precision (bf16 where the CPU has it, int8 where it
    /// has VNNI or AVX2) instead of one run.
    #[arg(long)]
    sweep: bool,
    /// Time the forward products with int8 weights and activations (Q8_0, as
    /// `generate --weights q8`) instead of the fp32/bf16 training products.
    #[arg(long, conflicts_with = "sweep")]
    int8: bool,
    /// Weight shapes to time instead of the model's, as IN:OUT pairs, comma-separated (e.g.
    /// 768:768,768:2048); each is timed on --rows rows.
    #[arg(long, value_delimiter = ',')]
    shapes: Vec<String>,
    /// Rows (tokens) of the activations.
    #[arg(long, default_value_t = 1024)]
    rows: usize,
    #[command(flatten)]
    backend: BackendArgs,
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long)]
    json: bool,
}

/// The products of one row of the sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum SweepPrecision {
    Fp32,
    Bf16,
    /// Q8_0 weights and activations.
    Int8,
}

impl SweepPrecision {
    fn name(self) -> &'static str {
        match self {
            SweepPrecision::Fp32 => "fp32",
            SweepPrecision::Bf16 => "bf16",
            SweepPrecision::Int8 => "int8",
        }
    }

    /// The theoretical rate of these products on `theo`'s threads (fp32 where there is none).
    fn ceiling(self, theo: &TheoreticalPeak) -> f64 {
        match self {
            SweepPrecision::Fp32 => theo.fp32_gflops,
            SweepPrecision::Bf16 => theo.bf16_gflops.unwrap_or(theo.fp32_gflops),
            SweepPrecision::Int8 => theo.int8_gops.unwrap_or(theo.fp32_gflops),
        }
    }

    /// Times `shapes` on `threads` threads.
    fn run(
        self,
        shapes: &[(String, usize, usize)],
        rows: usize,
        threads: usize,
    ) -> Result<Vec<MatmulResult>> {
        let prec = match self {
            SweepPrecision::Int8 => {
                return pool(Some(threads))?.install(|| bench::matmul::run_int8(shapes, rows, 3));
            }
            SweepPrecision::Bf16 => Precision::Bf16,
            SweepPrecision::Fp32 => Precision::Fp32,
        };
        let kernels = Backend::cpu(prec).kernels()?;
        pool(Some(threads))?.install(|| {
            bench::matmul::run_shapes(
                kernels.as_ref(),
                shapes,
                rows,
                3,
                self == SweepPrecision::Bf16,
            )
        })
    }
}

impl std::fmt::Display for SweepPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

/// One row of the sweep: threads, precision, its theoretical rate, the product, and why it is
/// rejected (if it is).
type SweepRow = (usize, SweepPrecision, f64, MatmulResult, Option<String>);

pub(super) fn run(a: MatmulBenchArgs) -> Result<()> {
    let cfg = ModelConfig::from_preset_or_path(&a.model)?;
    if a.rows == 0 {
        return Err(Error::invalid("--rows must be at least 1"));
    }
    if a.sweep {
        return sweep(&a, &cfg);
    }
    single(&a, &cfg)
}

/// Why a result is not reported, if it is not.
fn verdict(r: &MatmulResult, ceiling: f64) -> Option<String> {
    if !r.verified {
        return Some(format!(
            "UNVERIFIED: error {:.1e} against the f64 product",
            r.max_rel_err
        ));
    }
    if r.gflops > ceiling {
        return Some(format!(
            "INVALID: above the theoretical peak {ceiling:.0} GFLOP/s"
        ));
    }
    None
}

fn sweep(a: &MatmulBenchArgs, cfg: &ModelConfig) -> Result<()> {
    let max_threads = a
        .threads
        .unwrap_or_else(crate::train::default_threads)
        .max(1);
    let mut precisions = vec![SweepPrecision::Fp32];
    if crate::backend::cpu::bf16_in_hardware() {
        precisions.push(SweepPrecision::Bf16);
    }
    let theo_all = bench::peak::theoretical_peak(max_threads);
    if theo_all.int8_gops.is_some() {
        precisions.push(SweepPrecision::Int8);
    }
    let shapes = shapes(a, cfg)?;
    let mut rows_out: Vec<SweepRow> = Vec::new();
    for t in 1..=max_threads {
        let theo = bench::peak::theoretical_peak(t);
        for &p in &precisions {
            let results = p.run(&shapes, a.rows, t)?;
            let ceiling = p.ceiling(&theo);
            for r in results {
                let verdict = verdict(&r, ceiling);
                rows_out.push((t, p, ceiling, r, verdict));
            }
        }
    }
    if a.json {
        let v: Vec<_> = rows_out
            .iter()
            .map(|(t, p, c, r, v)| serde_json::json!({"threads": t, "precision": p, "theoretical_gflops": c, "result": r, "rejected": v}))
            .collect();
        return print_json(
            "matmul",
            &serde_json::json!({"sweep": v, "theoretical": bench::peak::theoretical_peak(max_threads)}),
        );
    }
    print_sweep(&rows_out, max_threads);
    let bad = rows_out.iter().filter(|x| x.4.is_some()).count();
    if bad > 0 {
        return Err(Error::invalid(format!("{bad} results failed verification")));
    }
    Ok(())
}

fn print_sweep(rows: &[SweepRow], max_threads: usize) {
    println!(
        "theoretical peak: {}",
        bench::peak::theoretical_peak(max_threads).assumptions
    );
    println!(
        "{:>7} {:>5} {:28} {:6} {:>19} {:>9} {:>12}  verdict",
        "threads", "prec", "weight", "pass", "m x k x n", "GFLOP/s", "% theoretical"
    );
    for (t, p, c, r, v) in rows {
        println!(
            "{:>7} {:>5} {:28} {:6} {:>5}x{:>6}x{:>6} {:>9.1} {:>12.1}%  {}",
            t,
            p,
            r.weight,
            r.pass,
            r.m,
            r.k,
            r.n,
            r.gflops,
            100.0 * r.gflops / c,
            v.as_deref().unwrap_or("ok")
        );
    }
}

/// The shapes of `--shapes`, else the model's weight shapes.
fn shapes(a: &MatmulBenchArgs, cfg: &ModelConfig) -> Result<Vec<(String, usize, usize)>> {
    if a.shapes.is_empty() {
        return Ok(bench::matmul::weight_shapes(cfg));
    }
    a.shapes
        .iter()
        .map(|s| {
            let bad = || Error::invalid(format!("--shapes: '{s}' is not IN:OUT (e.g. 768:2048)"));
            let (i, o) = s.split_once(':').ok_or_else(bad)?;
            let (i, o): (usize, usize) = (
                i.trim().parse().map_err(|_| bad())?,
                o.trim().parse().map_err(|_| bad())?,
            );
            if i == 0 || o == 0 || i > 1 << 20 || o > 1 << 20 {
                return Err(Error::invalid(format!(
                    "--shapes: '{s}' must be between 1 and 1048576 on each side"
                )));
            }
            Ok((format!("{i}:{o}"), i, o))
        })
        .collect()
}

/// The measured peaks of this machine: fp32 (GFLOP/s and the instruction set) and bf16.
struct MeasuredPeaks {
    fp32: f64,
    fp32_isa: &'static str,
    bf16: Option<f64>,
    /// Measured only for `--int8`.
    int8: Option<f64>,
}

/// One run on `--backend` (or int8 products with `--int8`).
fn single(a: &MatmulBenchArgs, cfg: &ModelConfig) -> Result<()> {
    let backend = a.backend.resolve();
    let kernels = backend.kernels()?;
    let shapes = shapes(a, cfg)?;
    let (peaks, results) = pool(a.threads)?.install(|| {
        let (fp32, fp32_isa) = bench::peak::fp32_peak(1.0);
        let bf16 = bench::peak::bf16_peak(1.0);
        let int8 = if a.int8 {
            bench::peak::int8_peak(1.0)
        } else {
            None
        };
        let results = if a.int8 {
            bench::matmul::run_int8(&shapes, a.rows, 3)
        } else {
            bench::matmul::run_shapes(
                kernels.as_ref(),
                &shapes,
                a.rows,
                3,
                backend.precision == Precision::Bf16,
            )
        };
        (
            MeasuredPeaks {
                fp32,
                fp32_isa,
                bf16,
                int8,
            },
            results,
        )
    });
    let results = results?;
    let theo = bench::peak::theoretical_peak(
        a.threads
            .unwrap_or_else(crate::train::default_threads)
            .max(1),
    );
    let int8_ceiling = bench::peak::int8_ceiling(theo.int8_gops, theo.fp32_gflops);
    // Int8 products against the measured `vpdpbusd` peak, else the theoretical one.
    let own_peak = match (a.int8, backend.precision) {
        (true, _) => peaks.int8.unwrap_or(int8_ceiling),
        (false, Precision::Fp32 | Precision::Fp16) => peaks.fp32,
        (false, Precision::Bf16) => peaks.bf16.unwrap_or(f64::NAN),
    };
    let ceiling = match (a.int8, backend.precision) {
        (true, _) => int8_ceiling,
        (false, Precision::Fp32 | Precision::Fp16) => theo.fp32_gflops,
        (false, Precision::Bf16) => theo.bf16_gflops.unwrap_or(theo.fp32_gflops),
    };
    if a.json {
        return print_json(
            "matmul",
            &serde_json::json!({
                "backend": backend.info(), "fp32_peak_gflops": peaks.fp32, "fp32_isa": peaks.fp32_isa,
                "f32_path": crate::backend::cpu::f32_path().name(),
                "bf16_peak_gflops": peaks.bf16, "int8_peak_gops": peaks.int8,
                "theoretical": theo, "int8": a.int8,
                "int8_isa": a.int8.then(|| crate::backend::cpu::quant::dot_isa().describe()),
                "matmuls": results
            }),
        );
    }
    print_peaks(&peaks, &theo, a.int8, int8_ceiling, &backend);
    let bad = print_products(&results, own_peak, ceiling);
    if bad > 0 {
        return Err(Error::invalid(format!(
            "{bad} products failed verification (see above)"
        )));
    }
    Ok(())
}

fn print_peaks(
    peaks: &MeasuredPeaks,
    theo: &TheoreticalPeak,
    int8: bool,
    int8_ceiling: f64,
    backend: &Backend,
) {
    println!(
        "fp32 FMA peak ({}): {:.1} GFLOP/s (measured)",
        peaks.fp32_isa, peaks.fp32
    );
    println!(
        "theoretical: {:.0} GFLOP/s fp32 = {}",
        theo.fp32_gflops, theo.assumptions
    );
    match peaks.bf16 {
        Some(b) => println!(
            "bf16 peak ({}): {b:.1} GFLOP/s (measured; theoretical {:.0})",
            bench::peak::bf16_isa(),
            theo.bf16_gflops.unwrap_or(f64::NAN)
        ),
        None => println!("bf16 dot peak: no AVX512_BF16 on this CPU"),
    }
    if int8 {
        let isa = crate::backend::cpu::quant::dot_isa().describe();
        match peaks.int8 {
            Some(p) => println!(
                "int8 peak (vpdpbusd): {p:.1} GOP/s (measured; theoretical {int8_ceiling:.0}); products: {isa}; % peak is of the measured peak"
            ),
            None => println!(
                "int8 products: {isa} (theoretical {int8_ceiling:.0} GOP/s; % peak is of that)"
            ),
        }
    } else {
        println!("matmuls on {backend}: {}", backend.info().details);
    }
}

/// Prints the products' table; returns how many failed their check.
fn print_products(results: &[MatmulResult], own_peak: f64, ceiling: f64) -> usize {
    println!(
        "\n{:28} {:6} {:>19} {:>9} {:>9} {:>7}",
        "weight", "pass", "m x k x n", "ms", "GFLOP/s", "% peak"
    );
    let mut bad = 0;
    for r in results {
        let verdict = verdict(r, ceiling);
        bad += verdict.is_some() as usize;
        println!(
            "{:28} {:6} {:>5}x{:>6}x{:>6} {:>9.2} {:>9.1} {:>6.1}%  {}",
            r.weight,
            r.pass,
            r.m,
            r.k,
            r.n,
            r.ms,
            r.gflops,
            100.0 * r.gflops / own_peak,
            verdict.as_deref().unwrap_or("")
        );
    }
    bad
}
