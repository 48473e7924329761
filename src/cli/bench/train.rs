//! `handgrad bench train`.

use clap::Args;

use super::{measure_peak, pool, print_json};
use crate::bench;
use crate::bench::train::{TrainBench, TrainRun};
use crate::cli::backend_args::BackendArgs;
use crate::error::{Error, Result};
use crate::model::ModelConfig;

#[derive(Args, Debug)]
pub(super) struct TrainBenchArgs {
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
    /// Time a LoRA fine-tuning step instead: adapters of rank R on the frozen model.
    #[arg(long, value_name = "R")]
    lora_rank: Option<usize>,
    /// Projections the adapters adapt (comma-separated q,k,v,o,gate,up,down, or all-linear).
    #[arg(long, default_value = "all-linear", requires = "lora_rank")]
    lora_targets: String,
    /// How the LoRA step holds the frozen model: f32, bf16 or q8.
    #[arg(long, value_enum, default_value_t = crate::model::BaseFormat::F32, requires = "lora_rank")]
    base_weights: crate::model::BaseFormat,
}

pub(super) fn run(a: TrainBenchArgs) -> Result<()> {
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
        lora: match a.lora_rank {
            Some(rank) => Some(crate::model::LoraConfig {
                rank,
                alpha: 2.0 * rank as f64,
                targets: crate::model::LoraTarget::parse_list(&a.lora_targets)?,
                dropout: 0.0,
            }),
            None => None,
        },
        base_weights: a.base_weights,
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
    print_summary(&r);
    print_breakdown(&r);
    Ok(())
}

fn print_summary(r: &TrainBench) {
    let trained = if r.trained_params != r.params {
        format!(
            " ({} trained)",
            crate::model::config::human_count(r.trained_params)
        )
    } else {
        String::new()
    };
    println!(
        "{}: {} parameters{trained}, batch {} x seq {}, {} {} ({}), {} threads, {} steps",
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
}

fn print_breakdown(r: &TrainBench) {
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
}
