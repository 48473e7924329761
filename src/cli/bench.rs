//! `handgrad bench {train, matmul, generate}`.

use clap::{Args, Subcommand};

use super::backend_args::BackendArgs;
use crate::backend::{Backend, Precision};
use crate::bench;
use crate::bench::generate::GenerateRun;
use crate::bench::train::TrainRun;
use crate::error::{Error, Result};
use crate::generate::WeightFormat;
use crate::model::ModelConfig;

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
    Train(TrainBenchArgs),
    /// Time prefill and decoding (KV cache) against the memory-bandwidth roofline.
    Generate(GenerateBenchArgs),
    /// Measure the arithmetic peak (fp32 FMA, bf16 dot) and the matmul throughput of a model's
    /// shapes.
    Matmul(MatmulBenchArgs),
    /// Read bandwidth (one thread and all) and load latency against working-set size, with the
    /// cache-level cliffs found and the sizes the OS reports.
    Memory(MemoryBenchArgs),
    /// Per-call latency of the kernels at tiny sizes, per backend (cpu fp32 and bf16, ane-sim,
    /// ane where available).
    Latency(LatencyBenchArgs),
    /// Merge result files (`bench ... --json`, `ane probe -o`) from many machines into one
    /// Markdown report; files that fail validation are left out with the reason.
    Report(ReportArgs),
}

#[derive(Args, Debug)]
struct LatencyBenchArgs {
    /// Backends to time, comma-separated: cpu (fp32), cpu-bf16, ane-sim, ane.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "cpu,cpu-bf16,ane-sim,ane"
    )]
    backends: Vec<String>,
    /// Seconds spent on each operation.
    #[arg(long, default_value_t = 0.2)]
    seconds: f64,
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// Result files.
    #[arg(required = true)]
    files: Vec<std::path::PathBuf>,
    /// The Markdown file to write; PNG charts are written beside it (REPORT-generate.png, ...).
    #[arg(long, short, default_value = "REPORT.md")]
    out: std::path::PathBuf,
    /// Write no PNG charts.
    #[arg(long)]
    no_charts: bool,
}

#[derive(Args, Debug)]
struct MemoryBenchArgs {
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

#[derive(Args, Debug)]
struct TrainBenchArgs {
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
    #[command(flatten)]
    backend: BackendArgs,
    /// Worker threads (default: physical cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct GenerateBenchArgs {
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
    /// Backend and precision of the prompt's batched pass [default precision: bf16 with
    /// --weights bf16 on CPUs with AVX512_BF16, else fp32].
    #[command(flatten)]
    backend: BackendArgs,
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct MatmulBenchArgs {
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

use super::thread_pool as pool;

/// Prints a result in the benchmark envelope (schema, machine, date).
fn print_json(bench: &str, v: &impl serde::Serialize) -> Result<()> {
    let e = crate::bench::machine::Envelope::new(bench, v);
    println!(
        "{}",
        serde_json::to_string_pretty(&e).map_err(|e| Error::json("writing results", e))?
    );
    Ok(())
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.command {
        BenchCommand::Train(a) => train(a),
        BenchCommand::Generate(a) => generate(a),
        BenchCommand::Matmul(a) => matmul(a),
        BenchCommand::Memory(a) => memory(a),
        BenchCommand::Report(a) => report(a),
        BenchCommand::Latency(a) => latency(a),
    }
}

fn latency(a: LatencyBenchArgs) -> Result<()> {
    use crate::backend::BackendKind;
    if !(a.seconds > 0.0 && a.seconds.is_finite()) {
        return Err(Error::invalid("--seconds must be positive"));
    }
    let mut backends = Vec::new();
    for b in &a.backends {
        backends.push(match b.trim() {
            "cpu" | "cpu-fp32" => Backend::cpu(Precision::Fp32),
            "cpu-bf16" => Backend::cpu(Precision::Bf16),
            "ane-sim" => Backend {
                kind: BackendKind::AneSim,
                precision: Precision::Fp32,
            },
            "ane" => Backend {
                kind: BackendKind::Ane,
                precision: Precision::Fp32,
            },
            other => {
                return Err(Error::invalid(format!(
                    "--backends: unknown '{other}' (cpu, cpu-bf16, ane-sim, ane)"
                )));
            }
        });
    }
    let results: Vec<_> = pool(a.threads)?.install(|| {
        backends
            .iter()
            .map(|&b| bench::latency::measure(b, a.seconds))
            .collect()
    });
    if a.json {
        return print_json("latency", &serde_json::json!({ "backends": results }));
    }
    println!(
        "{:14} {:16} {:34} {:>12} {:>12} {:>8}",
        "backend", "op", "size", "median us", "fastest us", "calls"
    );
    for r in &results {
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
    Ok(())
}

fn report(a: ReportArgs) -> Result<()> {
    let mut files = Vec::new();
    for f in &a.files {
        let text = std::fs::read_to_string(f).map_err(|e| Error::io("reading", f, e))?;
        let v: serde_json::Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => serde_json::json!({ "unreadable": e.to_string() }),
        };
        files.push((f.display().to_string(), v));
    }
    let (mut md, rejected) = bench::report::report(&files);
    if !a.no_charts {
        let ok: Vec<(String, &serde_json::Value)> = files
            .iter()
            .filter_map(|(_, v)| bench::report::validate(v).ok().map(|k| (k, v)))
            .collect();
        match bench::charts::report_charts(&ok, &a.out) {
            Ok(charts) if !charts.is_empty() => {
                md.push_str("## Charts\n\n");
                for (title, path) in charts {
                    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    md.push_str(&format!("![{title}]({name})\n\n"));
                    println!("wrote {}", path.display());
                }
            }
            Ok(_) => {}
            Err(e) => eprintln!("warning: no charts: {e}"),
        }
    }
    crate::util::fsutil::write_atomic(&a.out, |w| std::io::Write::write_all(w, md.as_bytes()))?;
    for r in &rejected {
        eprintln!("warning: {} left out: {}", r.file, r.reason);
    }
    println!(
        "wrote {} ({} of {} files)",
        a.out.display(),
        files.len() - rejected.len(),
        files.len()
    );
    if rejected.len() == files.len() {
        return Err(Error::invalid("no result file passed validation"));
    }
    Ok(())
}

fn memory(a: MemoryBenchArgs) -> Result<()> {
    let max = crate::bench::machine::parse_size(&a.max.replace(['B', 'b'], ""))
        .filter(|&m| m >= 4096)
        .ok_or_else(|| {
            Error::invalid(format!(
                "--max {}: expected a size such as 64M or 1G (at least 4K)",
                a.max
            ))
        })?;
    if !(a.seconds > 0.0 && a.seconds.is_finite()) {
        return Err(Error::invalid("--seconds must be positive"));
    }
    let sizes = bench::memory::sizes(max);
    let r = pool(a.threads)?.install(|| bench::memory::sweep(&sizes, a.seconds));
    if a.json {
        return print_json("memory", &r);
    }
    let m = crate::bench::machine::MachineInfo::detect();
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
    Ok(())
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

/// The measured arithmetic peak of a precision (GFLOP/s); NaN where it cannot run.
fn measure_peak(precision: Precision, seconds: f64) -> f64 {
    match precision {
        Precision::Bf16 => bench::peak::bf16_peak(seconds).unwrap_or(f64::NAN),
        // The CPU's share of an fp16 (Neural Engine) step runs in fp32.
        Precision::Fp32 | Precision::Fp16 => bench::peak::fp32_peak(seconds).0,
    }
}

fn train(a: TrainBenchArgs) -> Result<()> {
    let cfg = ModelConfig::from_preset_or_path(&a.model)?;
    if a.seq > cfg.max_seq_len {
        return Err(Error::invalid(format!(
            "--seq {} exceeds the model's {} positions",
            a.seq, cfg.max_seq_len
        )));
    }
    if a.batch == 0 || a.seq == 0 || a.steps == 0 {
        return Err(Error::invalid(
            "--batch, --seq and --steps must be at least 1",
        ));
    }
    let backend = a.backend.resolve();
    for w in backend.warnings() {
        eprintln!("warning: {w}");
    }
    let run = TrainRun {
        name: &a.model,
        cfg: &cfg,
        batch: a.batch,
        seq: a.seq,
        steps: a.steps,
    };
    let r = pool(a.threads)?.install(|| {
        // Measured before and after the steps; the higher value counts (a shared host can
        // steal a core during one measurement).
        let before = measure_peak(backend.precision, 0.5);
        let mut r = bench::train::run(&backend, &run, before)?;
        r.peak_gflops = before.max(measure_peak(backend.precision, 0.5));
        r.mfu = r.gflops / r.peak_gflops;
        Ok::<_, Error>(r)
    })?;
    if a.json {
        return print_json("train", &r);
    }
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "{}: {} parameters, batch {} x seq {}, {} {} ({}), {} threads, {} steps",
        r.model,
        crate::model::config::human_count(r.params),
        r.batch,
        r.seq,
        r.backend.backend,
        r.backend.precision,
        r.backend.details,
        r.threads,
        r.steps
    );
    if let Some(a) = &r.accelerator {
        println!(
            "accelerator (last step): programs {:.1} ms, staging {:.1} ms, {} evaluations; {:.1} MB written into surfaces ({:.1} MB of it weights)",
            a.kernel_ms,
            a.staging_ms,
            a.calls,
            a.bytes_staged as f64 / 1e6,
            a.weight_bytes_staged as f64 / 1e6
        );
    }
    println!(
        "step: median {:.1} ms (min {:.1}, max {:.1}) | {:.0} tokens/s | {:.1} GFLOP/s | MFU {:.1}% of the measured {} peak {:.1} GFLOP/s",
        r.median_ms,
        r.min_ms,
        r.max_ms,
        r.tokens_per_s,
        r.gflops,
        100.0 * r.mfu,
        r.backend.precision,
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
        "\n{:16} {:38} {:>10} {:>7}",
        "breakdown", "(mean per step)", "ms", "%"
    );
    for e in r.breakdown.iter().filter(|e| e.ms > 0.0) {
        println!(
            "{:16} {:38} {:>10.1} {:>6.1}%",
            e.section, e.label, e.ms, e.percent
        );
    }
    Ok(())
}

fn generate(a: GenerateBenchArgs) -> Result<()> {
    let cfg = ModelConfig::from_preset_or_path(&a.model)?;
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
    };
    let r = pool(a.threads)?.install(|| -> Result<_> {
        let mut r = bench::generate::run(kernels.as_ref(), &a.model, &cfg, run)?;
        // The prompt's products run in the backend's precision (int8 with q8 weights, which
        // has no measured peak).
        if a.weights != WeightFormat::Q8 && kernels.products_on_cpu() {
            let peak = measure_peak(backend.precision, 0.5);
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
    println!(
        "{}: {} weights, prompt on {backend}, {} threads",
        r.model, r.weights, r.threads
    );
    let of_peak = match (r.prefill_fraction_of_peak, r.prefill_peak_gflops) {
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
        "prefill / decode speed: {:.1}x",
        r.prefill_tokens_per_s / r.decode_tokens_per_s
    );
    println!(
        "\n{:16} {:38} {:>10} {:>7}",
        "breakdown", "(mean per decoded token)", "ms", "%"
    );
    for e in &r.decode_breakdown {
        println!(
            "{:16} {:38} {:>10.2} {:>6.1}%",
            e.section, e.label, e.ms, e.percent
        );
    }
    Ok(())
}

/// Why a result is not reported, if it is not.
fn matmul_verdict(r: &bench::matmul::MatmulResult, ceiling: f64) -> Option<String> {
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

fn matmul_sweep(a: &MatmulBenchArgs, cfg: &ModelConfig) -> Result<()> {
    let max_threads = a
        .threads
        .unwrap_or_else(crate::train::default_threads)
        .max(1);
    let mut precisions = vec!["fp32"];
    if crate::backend::cpu::bf16_in_hardware() {
        precisions.push("bf16");
    }
    let theo_all = bench::peak::theoretical_peak(max_threads);
    if theo_all.int8_gops.is_some() {
        precisions.push("int8");
    }
    let shapes = matmul_shapes(a, cfg)?;
    let mut rows_out = Vec::new();
    for t in 1..=max_threads {
        let theo = bench::peak::theoretical_peak(t);
        for &p in &precisions {
            let results = if p == "int8" {
                pool(Some(t))?.install(|| bench::matmul::run_int8(&shapes, a.rows, 3))?
            } else {
                let prec = if p == "bf16" {
                    Precision::Bf16
                } else {
                    Precision::Fp32
                };
                let kernels = Backend::cpu(prec).kernels()?;
                pool(Some(t))?.install(|| {
                    bench::matmul::run_shapes(kernels.as_ref(), &shapes, a.rows, 3, p == "bf16")
                })?
            };
            let ceiling = match p {
                "bf16" => theo.bf16_gflops.unwrap_or(theo.fp32_gflops),
                "int8" => theo.int8_gops.unwrap_or(theo.fp32_gflops),
                _ => theo.fp32_gflops,
            };
            for r in results {
                let verdict = matmul_verdict(&r, ceiling);
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
    println!(
        "theoretical peak: {}",
        bench::peak::theoretical_peak(max_threads).assumptions
    );
    println!(
        "{:>7} {:>5} {:28} {:6} {:>19} {:>9} {:>12}  verdict",
        "threads", "prec", "weight", "pass", "m x k x n", "GFLOP/s", "% theoretical"
    );
    for (t, p, c, r, v) in &rows_out {
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
    let bad = rows_out.iter().filter(|x| x.4.is_some()).count();
    if bad > 0 {
        return Err(Error::invalid(format!("{bad} results failed verification")));
    }
    Ok(())
}

/// The shapes of `--shapes`, else the model's weight shapes.
fn matmul_shapes(a: &MatmulBenchArgs, cfg: &ModelConfig) -> Result<Vec<(String, usize, usize)>> {
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

fn matmul(a: MatmulBenchArgs) -> Result<()> {
    let cfg = ModelConfig::from_preset_or_path(&a.model)?;
    if a.rows == 0 {
        return Err(Error::invalid("--rows must be at least 1"));
    }
    if a.sweep {
        return matmul_sweep(&a, &cfg);
    }
    let backend = a.backend.resolve();
    let kernels = backend.kernels()?;
    let shapes = matmul_shapes(&a, &cfg)?;
    let (peak, isa, bf16, results) = pool(a.threads)?.install(|| {
        let (peak, isa) = bench::peak::fp32_peak(1.0);
        let bf16 = bench::peak::bf16_peak(1.0);
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
        (peak, isa, bf16, results)
    });
    let results = results?;
    let theo = bench::peak::theoretical_peak(
        a.threads
            .unwrap_or_else(crate::train::default_threads)
            .max(1),
    );
    let int8_ceiling = bench::peak::int8_ceiling(theo.int8_gops, theo.fp32_gflops);
    // There is no measured int8 peak: int8 products are compared with the theoretical one.
    let own_peak = match (a.int8, backend.precision) {
        (true, _) => int8_ceiling,
        (false, Precision::Fp32 | Precision::Fp16) => peak,
        (false, Precision::Bf16) => bf16.unwrap_or(f64::NAN),
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
                "backend": backend.info(), "fp32_peak_gflops": peak, "fp32_isa": isa,
                "f32_path": crate::backend::cpu::f32_path().name(),
                "bf16_peak_gflops": bf16, "theoretical": theo, "int8": a.int8,
                "int8_isa": a.int8.then(|| crate::backend::cpu::quant::dot_isa().describe()),
                "matmuls": results
            }),
        );
    }
    println!("fp32 FMA peak ({isa}): {peak:.1} GFLOP/s (measured)");
    println!(
        "theoretical: {:.0} GFLOP/s fp32 = {}",
        theo.fp32_gflops, theo.assumptions
    );
    match bf16 {
        Some(b) => println!(
            "bf16 peak ({}): {b:.1} GFLOP/s (measured; theoretical {:.0})",
            bench::peak::bf16_isa(),
            theo.bf16_gflops.unwrap_or(f64::NAN)
        ),
        None => println!("bf16 dot peak: no AVX512_BF16 on this CPU"),
    }
    if a.int8 {
        println!(
            "int8 products: {} (theoretical {int8_ceiling:.0} GOP/s; % peak is of that)",
            crate::backend::cpu::quant::dot_isa().describe()
        );
    } else {
        println!("matmuls on {backend}: {}", backend.info().details);
    }
    println!(
        "\n{:28} {:6} {:>19} {:>9} {:>9} {:>7}",
        "weight", "pass", "m x k x n", "ms", "GFLOP/s", "% peak"
    );
    let mut bad = 0;
    for r in &results {
        let verdict = matmul_verdict(r, ceiling);
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
    if bad > 0 {
        return Err(Error::invalid(format!(
            "{bad} products failed verification (see above)"
        )));
    }
    Ok(())
}
