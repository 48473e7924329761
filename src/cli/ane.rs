//! `handgrad ane {emit, check}`: write the ten Neural Engine kernels of a model as MIL programs
//! and weight files (what a Mac compiles), and check a MIL file against the simulator's types
//! and the hardware's known rules.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use crate::backend::ane::kernels::{Kernel, KernelShape, build_all};
use crate::backend::ane::lint::{self, Severity};
use crate::backend::ane::mil::parse::parse;
use crate::backend::ane::mil::{Literal, OpKind, ProgramFiles, Target, WEIGHTS_PREFIX};
use crate::backend::ane::sim;
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::util::fsutil::{create_dir_all, write_atomic};

/// The Apple Neural Engine programs.
#[derive(Args, Debug)]
pub struct AneArgs {
    #[command(subcommand)]
    command: AneCommand,
}

#[derive(Subcommand, Debug)]
enum AneCommand {
    /// Write the ten kernels of a model as MIL programs with their weight files, and a README
    /// listing their surfaces.
    Emit {
        /// Model preset or config.json.
        #[arg(long)]
        model: String,
        /// Output folder (one sub-folder per kernel: model.mil and weights/).
        #[arg(long)]
        out: PathBuf,
        /// Sequence length the kernels are compiled for [default: 256, or the model's limit].
        #[arg(long)]
        seq: Option<usize>,
        /// Program form: ios18 (program 1.3; M3, M4 and later) or ios16 (program 1.0; M1, M2).
        #[arg(long, value_enum, default_value_t = Target::Ios18)]
        target: Target,
    },
    /// Check a MIL file: syntax, the type and shape of every statement, weight files, and the
    /// hardware's known rules. Exits non-zero on errors.
    Check {
        /// A MIL text file (its weights are read from `weights/` beside it).
        file: PathBuf,
        /// The folder `@model_path` stands for [default: the file's folder].
        #[arg(long)]
        model_path: Option<PathBuf>,
    },
    /// Benchmark this Mac's Neural Engine: peak throughput (a chain of 1x1 convolutions),
    /// latency per call over sizes, or throughput against weight size (the on-chip memory
    /// cliff). Every result is checked against the CPU's output and the chip's rated peak.
    Probe {
        /// peak, latency, sram or int8.
        #[arg(value_enum)]
        probe: crate::backend::ane::probe::ProbeKind,
        /// One case instead of the default sweep: channels (with --spatial and --depth).
        #[arg(long)]
        channels: Option<usize>,
        /// Columns of the case [default: 64].
        #[arg(long, default_value_t = 64)]
        spatial: usize,
        /// Convolutions of the case [default: 1; peak: 128].
        #[arg(long)]
        depth: Option<usize>,
        /// Timed evaluations per case.
        #[arg(long, default_value_t = 50)]
        evals: usize,
        /// Untimed evaluations first.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Write the results (JSON) here, to attach to an issue or merge into a report.
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// The device: ane, or fake (the runtime's fake device running the simulator;
        /// correct outputs, meaningless timings: for testing the probes anywhere).
        #[arg(long, value_enum, default_value_t = Device::Ane, hide = true)]
        device: Device,
    },
    /// Check the ten kernels on this Mac's Neural Engine, the first thing to run on a Mac:
    /// compile and load each kernel of each model on its own, run it on random data on the
    /// device and in handgrad's simulator, and print a table (compiled, loaded, largest error
    /// against the simulator, time per call, verdict); then an fp16 and (ios18 form) an int8
    /// probe. Write the JSON with --json and attach it to an issue. A kernel that fails here
    /// runs on the CPU when training (or, with --ane-strict, stops the run).
    Selftest {
        /// Models to check [default: stories110m, then qwen3-0.6b]; repeat the flag for more.
        #[arg(long)]
        model: Vec<String>,
        /// Sequence length the kernels are built for [default: 256, or the model's limit].
        #[arg(long)]
        seq: Option<usize>,
        /// Timed evaluations per kernel.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Write the results here (JSON).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Program form [default: the chip's: ios16 on M1/M2, ios18 on M3 and later].
        #[arg(long, value_enum)]
        target: Option<Target>,
        /// The device: ane, or fake (the runtime's fake device running the simulator; for
        /// testing the self-test anywhere).
        #[arg(long, value_enum, default_value_t = Device::Ane, hide = true)]
        device: Device,
    },
    /// Validate probe result files: recompute every figure, reject impossible or unverified
    /// results with the reason. Exits non-zero if any is rejected.
    Validate {
        /// Result files written by `handgrad ane probe --out`.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

pub fn run(a: AneArgs) -> Result<()> {
    match a.command {
        AneCommand::Emit {
            model,
            out,
            seq,
            target,
        } => emit(&model, &out, seq, target),
        AneCommand::Check { file, model_path } => check(&file, model_path.as_deref()),
        AneCommand::Probe {
            probe,
            channels,
            spatial,
            depth,
            evals,
            warmup,
            out,
            device,
        } => {
            let cases = match channels {
                Some(c) => vec![crate::backend::ane::probe::ProbeCase {
                    channels: c,
                    spatial,
                    depth: depth.unwrap_or(if probe == ProbeKind::Peak { 128 } else { 1 }),
                }],
                None => crate::backend::ane::probe::default_cases(probe),
            };
            run_probe(probe, &cases, evals, warmup, out.as_deref(), device)
        }
        AneCommand::Selftest {
            model,
            seq,
            runs,
            json,
            target,
            device,
        } => selftest(&model, seq, runs, json.as_deref(), target, device),
        AneCommand::Validate { files } => validate_files(&files),
    }
}

/// Where `probe` and `selftest` run (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Device {
    // This Mac's Neural Engine.
    Ane,
    // The runtime's fake device running the simulator: correct outputs, meaningless timings.
    Fake,
}

impl Device {
    /// The device as result files name it.
    fn report_name(self) -> &'static str {
        match self {
            Device::Ane => "ane",
            Device::Fake => "ane-fake",
        }
    }

    /// The platform and the chip's name.
    fn open(self) -> Result<(Box<dyn crate::backend::ane::runtime::AnePlatform>, String)> {
        use crate::backend::ane::runtime;
        match self {
            Device::Ane => Ok((
                Box::new(runtime::apple::ApplePlatform::open()?),
                runtime::chip_name().unwrap_or_else(|| "unknown Apple chip".into()),
            )),
            Device::Fake => Ok((
                Box::new(runtime::fake::FakePlatform::from_env()),
                "fake device (handgrad's simulator)".into(),
            )),
        }
    }

    /// Says so under the tables when the timings are the simulator's.
    fn note_fake_timings(self) {
        if self != Device::Ane {
            println!(
                "(fake device: the outputs are checked, the timings are the simulator's, not a Neural Engine's)"
            );
        }
    }
}

/// Writes `value` as pretty JSON to `path`.
fn write_json(path: &Path, value: &impl serde::Serialize, context: &str) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::json(context, e))?;
    write_atomic(path, |f| std::io::Write::write_all(f, &bytes))
}

/// What `ane selftest --json` writes.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct SelftestReport {
    pub schema: String,
    pub schema_version: u32,
    pub device: String,
    pub chip: String,
    pub os: String,
    pub handgrad_version: String,
    pub date_unix: u64,
    pub target: String,
    pub models: Vec<SelftestModel>,
    pub probes: Vec<probe::ProbeResult>,
    /// Probes that could not run, with why.
    pub probe_errors: Vec<String>,
}

/// The kernels of one model in a self-test.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct SelftestModel {
    pub model: String,
    pub seq: usize,
    pub kernels: Vec<crate::backend::ane::selftest::KernelCheck>,
}

fn selftest(
    models: &[String],
    seq: Option<usize>,
    runs: usize,
    json: Option<&Path>,
    target: Option<Target>,
    device: Device,
) -> Result<()> {
    use crate::backend::ane::runtime;
    let (platform, chip) = device.open()?;
    let target = target.unwrap_or_else(|| runtime::program_form(&chip));
    let shared: runtime::SharedPlatform = std::sync::Arc::new(std::sync::Mutex::new(platform));
    let models: Vec<String> = if models.is_empty() {
        vec!["stories110m".into(), "qwen3-0.6b".into()]
    } else {
        models.to_vec()
    };
    let mut report = SelftestReport {
        schema: "handgrad-ane-selftest".into(),
        schema_version: 1,
        device: device.report_name().into(),
        chip: chip.clone(),
        os: crate::bench::machine::os_description(),
        handgrad_version: env!("CARGO_PKG_VERSION").into(),
        date_unix: crate::telemetry::events::unix_now() as u64,
        target: target.to_string(),
        models: Vec::new(),
        probes: Vec::new(),
        probe_errors: Vec::new(),
    };
    println!(
        "Neural Engine self-test on {chip} ({} form)",
        target.opset()
    );
    let mut failed = 0;
    for model in &models {
        let checked = selftest_model(&shared, model, seq, runs, target)?;
        failed += checked.kernels.iter().filter(|c| !c.ok).count();
        report.models.push(checked);
    }
    selftest_probes(&shared, &chip, target, &mut report)?;
    device.note_fake_timings();
    if let Some(path) = json {
        write_json(path, &report, "writing the self-test")?;
        println!("wrote {} (attach it to an issue)", path.display());
    }
    let total: usize = report.models.iter().map(|m| m.kernels.len()).sum();
    if failed > 0 {
        return Err(Error::invalid(format!(
            "{failed} of {total} kernels cannot run on this device (training runs them on the CPU; see the verdicts above)"
        )));
    }
    println!("all {total} kernels run on this device and agree with the simulator");
    Ok(())
}

/// Checks the ten kernels of one model, printing a row for each.
fn selftest_model(
    shared: &crate::backend::ane::runtime::SharedPlatform,
    model: &str,
    seq: Option<usize>,
    runs: usize,
    target: Target,
) -> Result<SelftestModel> {
    use crate::backend::ane::runtime;
    use crate::backend::ane::selftest::check_kernel;
    let cfg = ModelConfig::from_preset_or_path(model)?;
    let seq = seq
        .unwrap_or_else(|| cfg.max_seq_len.min(256))
        .min(cfg.max_seq_len);
    let kernels = build_all(&KernelShape {
        dims: cfg.dims(),
        seq,
        target,
    })?;
    runtime::COMPILE_BUDGET.reserve(kernels.len())?;
    println!("\n{model}, seq {seq}:");
    println!(
        "{:<11} {:>8} {:>6} {:>11} {:>10}  verdict",
        "kernel", "compiled", "loaded", "max error", "ms/call"
    );
    let mut checks = Vec::new();
    for k in &kernels {
        let c = check_kernel(shared, k, runs);
        let yes = |b: bool| if b { "yes" } else { "no" };
        println!(
            "{:<11} {:>8} {:>6} {:>11} {:>10}  {}",
            c.kernel,
            yes(c.compiled),
            yes(c.loaded),
            c.max_rel_error.map_or("-".into(), |e| format!("{e:.2e}")),
            c.device_ms.map_or("-".into(), |m| format!("{m:.3}")),
            c.verdict
        );
        checks.push(c);
    }
    Ok(SelftestModel {
        model: model.to_string(),
        seq,
        kernels: checks,
    })
}

/// The self-test's probes: one fp16 convolution chain, and fp16 against W8A8 where the form
/// has quantize (ios18).
fn selftest_probes(
    shared: &crate::backend::ane::runtime::SharedPlatform,
    chip: &str,
    target: Target,
    report: &mut SelftestReport,
) -> Result<()> {
    use crate::backend::ane::runtime;
    let case = probe::ProbeCase {
        channels: 512,
        spatial: 64,
        depth: 32,
    };
    let rated = probe::rated_tops(chip);
    let mut precisions = vec![probe::ProbeDtype::Fp16];
    if target == Target::Ios18 {
        precisions.push(probe::ProbeDtype::Int8);
    } else {
        report
            .probe_errors
            .push("int8: skipped, the ios16 form has no quantize/dequantize".into());
    }
    println!("\nprobes (512 channels, 64 columns, 32 convolutions):");
    for precision in precisions {
        runtime::COMPILE_BUDGET.reserve(1)?;
        match probe::run_case(shared, &case, target, precision, 2, 10) {
            Ok(mut r) => {
                r.rejected = probe::check(&r, rated);
                println!(
                    "{:>5}: {:.3} ms/eval, {:.3} TFLOPS, rel err {:.1e}: {}",
                    precision.name(),
                    r.ms_per_eval,
                    r.tflops,
                    r.rel_rms_error,
                    r.rejected.as_deref().unwrap_or("ok")
                );
                report.probes.push(r);
            }
            Err(e) => {
                let line = format!("{precision:?}: {}", super::one_line(&e));
                println!("{line}");
                report.probe_errors.push(line);
            }
        }
    }
    Ok(())
}

use crate::backend::ane::probe::{self, ProbeKind, ProbeReport};

fn run_probe(
    kind: ProbeKind,
    cases: &[probe::ProbeCase],
    evals: usize,
    warmup: usize,
    out: Option<&Path>,
    device: Device,
) -> Result<()> {
    use crate::backend::ane::runtime;
    if cases
        .iter()
        .any(|c| c.channels == 0 || c.spatial == 0 || c.depth == 0)
    {
        return Err(Error::invalid(
            "--channels, --spatial and --depth must be at least 1",
        ));
    }
    let (platform, chip) = device.open()?;
    let target = runtime::program_form(&chip);
    let shared: runtime::SharedPlatform = std::sync::Arc::new(std::sync::Mutex::new(platform));
    let rated = probe::rated_tops(&chip);
    runtime::COMPILE_BUDGET.reserve(cases.len() * if kind == ProbeKind::Int8 { 2 } else { 1 })?;
    let mut report = ProbeReport {
        schema: probe::SCHEMA.into(),
        schema_version: probe::SCHEMA_VERSION,
        probe: kind,
        device: device.report_name().into(),
        chip: chip.clone(),
        os: crate::bench::machine::os_description(),
        handgrad_version: env!("CARGO_PKG_VERSION").into(),
        date_unix: crate::telemetry::events::unix_now() as u64,
        rated_tops: rated,
        results: Vec::new(),
        cliff_mb: None,
    };
    println!(
        "{kind:?} probe on {chip} ({} form; rated {}):",
        target.opset(),
        rated.map_or("unknown".to_string(), |t| format!("{t} TOPS"))
    );
    println!(
        "{:>5} {:>8} {:>8} {:>6} {:>10} {:>12} {:>10} {:>10}  verdict",
        "prec", "channels", "spatial", "depth", "weights MB", "ms/eval", "TFLOPS", "rel err"
    );
    if kind == ProbeKind::Int8 && target != Target::Ios18 {
        return Err(Error::invalid(
            "the int8 probe needs the ios18 program form (quantize/dequantize); this chip takes ios16",
        ));
    }
    let precisions: &[probe::ProbeDtype] = if kind == ProbeKind::Int8 {
        &[probe::ProbeDtype::Fp16, probe::ProbeDtype::Int8]
    } else {
        &[probe::ProbeDtype::Fp16]
    };
    for (c, &precision) in cases
        .iter()
        .flat_map(|c| precisions.iter().map(move |p| (c, p)))
    {
        report.results.push(probe_case(
            &shared, c, target, precision, warmup, evals, rated,
        )?);
    }
    let rejected = probe::validate(&mut report)?;
    summarise_probe(kind, &mut report);
    device.note_fake_timings();
    if let Some(path) = out {
        write_json(path, &report, "writing results")?;
        println!("wrote {}", path.display());
    }
    if rejected > 0 {
        return Err(Error::invalid(format!(
            "{rejected} of {} results failed validation (see the verdicts above)",
            report.results.len()
        )));
    }
    Ok(())
}

/// Runs and prints one case of a probe.
fn probe_case(
    shared: &crate::backend::ane::runtime::SharedPlatform,
    c: &probe::ProbeCase,
    target: Target,
    precision: probe::ProbeDtype,
    warmup: usize,
    evals: usize,
    rated: Option<f64>,
) -> Result<probe::ProbeResult> {
    let r = probe::run_case(shared, c, target, precision, warmup, evals)?;
    let verdict = probe::check(&r, rated);
    println!(
        "{:>5} {:>8} {:>8} {:>6} {:>10.2} {:>12.4} {:>10.3} {:>10.1e}  {}",
        precision.name(),
        c.channels,
        c.spatial,
        c.depth,
        r.weight_mb,
        r.ms_per_eval,
        r.tflops,
        r.rel_rms_error,
        verdict.as_deref().unwrap_or("ok")
    );
    Ok(r)
}

/// The lines under a probe's table: W8A8 against fp16 (int8), the on-chip memory cliff (sram).
fn summarise_probe(kind: ProbeKind, report: &mut ProbeReport) {
    if kind == ProbeKind::Int8 {
        for pair in report.results.chunks(2) {
            if let [a, b] = pair {
                println!(
                    "{}x{}x{}: W8A8 {:.2}x the fp16 throughput",
                    a.case.channels,
                    a.case.spatial,
                    a.case.depth,
                    b.tflops / a.tflops.max(1e-30)
                );
            }
        }
    }
    if kind == ProbeKind::Sram {
        report.cliff_mb = probe::cliff(&report.results);
        match report.cliff_mb {
            Some(mb) => println!(
                "throughput halves at {mb:.1} MB of weights: the on-chip memory is smaller"
            ),
            None => println!("no cliff within these sizes"),
        }
    }
}

fn validate_files(files: &[PathBuf]) -> Result<()> {
    let mut bad = 0;
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| Error::io("reading", f, e))?;
        let mut report: ProbeReport = serde_json::from_str(&text)
            .map_err(|e| Error::json(format!("reading {}", f.display()), e))?;
        let rejected = probe::validate(&mut report)
            .map_err(|e| Error::invalid(format!("{}: {e}", f.display())))?;
        for (i, r) in report.results.iter().enumerate() {
            if let Some(why) = &r.rejected {
                println!(
                    "{} result {i} ({}x{}x{}): rejected: {why}",
                    f.display(),
                    r.case.channels,
                    r.case.spatial,
                    r.case.depth
                );
            }
        }
        println!(
            "{}: {} results, {rejected} rejected ({} on {})",
            f.display(),
            report.results.len(),
            report.device,
            report.chip
        );
        bad += rejected;
    }
    if bad > 0 {
        return Err(Error::invalid(format!("{bad} results failed validation")));
    }
    Ok(())
}

fn surface(c: usize, w: usize) -> String {
    format!("[1, {c}, 1, {w}] ({:.1} KB)", (c * w * 2) as f64 / 1024.0)
}

fn describe(k: &Kernel) -> String {
    let parts = |v: &[crate::backend::ane::kernels::Slab]| {
        v.iter()
            .map(|s| {
                let w = if s.kind == crate::backend::ane::kernels::SlabKind::Weight {
                    " [w]"
                } else {
                    ""
                };
                format!("{} {}+{}{w}", s.name, s.start, s.len)
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "| {} | {} | {} | {} | {} |",
        k.kind.name(),
        surface(k.input.0, k.input.1),
        parts(&k.input_slabs),
        surface(k.output.0, k.output.1),
        parts(&k.output_slabs)
    )
}

fn emit(model: &str, out: &Path, seq: Option<usize>, target: Target) -> Result<()> {
    let cfg = ModelConfig::from_preset_or_path(model)?;
    let seq = seq.unwrap_or_else(|| cfg.max_seq_len.min(256));
    if seq == 0 || seq > cfg.max_seq_len {
        return Err(Error::invalid(format!(
            "--seq {seq} must be between 1 and the model's {} positions",
            cfg.max_seq_len
        )));
    }
    let shape = KernelShape {
        dims: cfg.dims(),
        seq,
        target,
    };
    let kernels = build_all(&shape)?;
    create_dir_all(out)?;
    let mut readme = readme_header(model, seq, target);
    let mut findings = Vec::new();
    for k in &kernels {
        write_kernel(&out.join(k.kind.name()), k)?;
        let _ = writeln!(readme, "{}", describe(k));
        for f in lint::lint(&k.program, &k.files) {
            findings.push(format!("- {}: {f}", k.kind.name()));
        }
    }
    let (distinct, unproven) = write_op_forms(&mut readme, &kernels);
    let _ = writeln!(readme, "\n## Lint (`handgrad ane check`)\n");
    if findings.is_empty() {
        let _ = writeln!(readme, "No rule fires.");
    } else {
        for f in &findings {
            let _ = writeln!(readme, "{f}");
        }
    }
    write_atomic(&out.join("README.md"), |f| {
        std::io::Write::write_all(f, readme.as_bytes())
    })?;
    println!(
        "wrote {} kernels for {model} (seq {seq}, {target}) to {}; {distinct} distinct op forms, {unproven} not yet run on the Neural Engine; {} lint finding(s), listed in README.md",
        kernels.len(),
        out.display(),
        findings.len()
    );
    Ok(())
}

/// The emitted README's title, introduction and the head of its kernel table.
fn readme_header(model: &str, seq: usize, target: Target) -> String {
    let mut readme = String::new();
    let _ = writeln!(
        readme,
        "# The ten ANE kernels of `{model}` at sequence length {seq}, target {target} (program({}))\n",
        target.program_version()
    );
    let _ = writeln!(
        readme,
        "Written by `handgrad ane emit`. Each folder holds `model.mil` and its `weights/` (one blob per file); `@model_path` is the folder. Inputs carry the activations in their first columns and the weights after them (dynamic weights: no recompile on update), each slab starting on a multiple of 32 columns (`name start+len`; `[w]` marks weights, written once per optimizer update); surfaces are fp16 `[1, C, 1, W]`, channel-first, unpadded.\n"
    );
    let _ = writeln!(
        readme,
        "| kernel | input | input columns | output | output channels |\n|---|---|---|---|---|"
    );
    readme
}

/// Writes a kernel's `model.mil` and weight blobs into `dir` (its `@model_path`).
fn write_kernel(dir: &Path, k: &Kernel) -> Result<()> {
    create_dir_all(&dir.join("weights"))?;
    write_atomic(&dir.join("model.mil"), |f| {
        std::io::Write::write_all(f, k.files.text.as_bytes())
    })?;
    for (path, bytes) in &k.files.blobs {
        let rel = path.strip_prefix("@model_path/").unwrap_or(path);
        write_atomic(&dir.join(rel), |f| std::io::Write::write_all(f, bytes))?;
    }
    Ok(())
}

/// Appends the README's op-forms section: one row per kernel, then the count over all of
/// them. Returns the number of distinct forms and how many of them are unproven.
fn write_op_forms(readme: &mut String, kernels: &[Kernel]) -> (usize, usize) {
    let _ = writeln!(
        readme,
        "\n## Op forms\n\nEach statement's form (op, operand ranks, broadcast axes, transpose flags, sliced and concatenated axes) against the forms proven on the chip (the original's kernels, run on M1 to M5; see `src/backend/ane/forms.rs`).\n\n| kernel | statements | forms | every form proven | unproven forms |\n|---|---|---|---|---|"
    );
    for k in kernels {
        let forms = crate::backend::ane::forms::forms(&k.program);
        let unproven: Vec<String> = forms
            .iter()
            .filter(|(_, ok, _)| !ok)
            .map(|(f, _, names)| format!("`{f}` ({})", names.join(", ")))
            .collect();
        let _ = writeln!(
            readme,
            "| {} | {} | {} | {} | {} |",
            k.kind.name(),
            k.program
                .ops
                .iter()
                .filter(|o| o.op_name() != "const")
                .count(),
            forms.len(),
            if unproven.is_empty() { "yes" } else { "no" },
            unproven.join("; ")
        );
    }
    let mut all: Vec<(crate::backend::ane::forms::Form, bool)> = Vec::new();
    for k in kernels {
        for (f, ok, _) in crate::backend::ane::forms::forms(&k.program) {
            if !all.iter().any(|(g, _)| *g == f) {
                all.push((f, ok));
            }
        }
    }
    let unproven = all.iter().filter(|(_, ok)| !ok).count();
    let _ = writeln!(
        readme,
        "\nAll ten kernels: {} distinct forms, {} of them outside the proven set.",
        all.len(),
        unproven
    );
    (all.len(), unproven)
}

/// The weight files a program names, read from the folder `@model_path` stands for.
fn read_weights(
    p: &crate::backend::ane::mil::Program,
    model_path: &Path,
) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    for op in &p.ops {
        if let OpKind::Const(Literal::Blob { path, .. }) = &op.kind
            && !out.iter().any(|(q, _)| q == path)
        {
            let rel = path
                .strip_prefix("@model_path/")
                .unwrap_or(path.trim_start_matches(WEIGHTS_PREFIX));
            if let Ok(bytes) = std::fs::read(model_path.join(rel)) {
                out.push((path.clone(), bytes));
            }
        }
    }
    out
}

fn check(file: &Path, model_path: Option<&Path>) -> Result<()> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io("reading", file, e))?;
    let program = parse(&text).map_err(|e| Error::format(file, e))?;
    let dir = model_path
        .map(Path::to_path_buf)
        .unwrap_or_else(|| file.parent().map(Path::to_path_buf).unwrap_or_default());
    let files = ProgramFiles {
        text,
        blobs: read_weights(&program, &dir),
    };
    let findings = lint::lint(&program, &files);
    for f in &findings {
        println!("{f}");
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let forms = crate::backend::ane::forms::forms(&program);
    let unproven = forms.iter().filter(|(_, ok, _)| !ok).count();
    println!(
        "forms: {} distinct, {}",
        forms.len(),
        if unproven == 0 {
            "all proven on the chip".to_string()
        } else {
            format!("{unproven} not yet run on the Neural Engine (ANE011 above)")
        }
    );
    let types = sim::check(&program, &files);
    match &types {
        Ok(_) => println!(
            "types: every statement checks ({} statements, target {})",
            program.ops.len(),
            program.target
        ),
        Err(e) => println!("types: {e}"),
    }
    println!(
        "{}: {errors} error(s), {} warning(s)",
        file.display(),
        findings.len() - errors
    );
    if let Err(e) = types {
        return Err(Error::format(file, e));
    }
    if errors > 0 {
        return Err(Error::format(
            file,
            format!("{errors} hardware rule(s) broken (listed above)"),
        ));
    }
    Ok(())
}
