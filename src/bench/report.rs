//! `handgrad bench report`: merges benchmark result files from many machines into one
//! Markdown report, after checking each file — a result that cannot be true (above the
//! measured peak, above the bandwidth roofline, an unverified probe) is left out with the
//! reason.

use std::fmt::Write as _;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny};
use serde_json::Value;

use super::machine::{SCHEMA, SCHEMA_VERSION};
use crate::backend::ane::probe;

/// A file left out of the report, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub file: String,
    pub reason: String,
}

/// One field of a result as the report reads it: files from other machines and versions may
/// lack it or hold something else, which the checks name (rather than failing to parse the
/// whole file).
#[derive(Debug, Clone, Default)]
enum Field<T> {
    #[default]
    Missing,
    Null,
    Is(T),
    Other,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Any<T> {
            Is(T),
            Null(()),
            Other(IgnoredAny),
        }
        Ok(match Any::deserialize(d)? {
            Any::Is(x) => Field::Is(x),
            Any::Null(()) => Field::Null,
            Any::Other(_) => Field::Other,
        })
    }
}

impl<T> Field<T> {
    fn get(&self) -> Option<&T> {
        match self {
            Field::Is(x) => Some(x),
            _ => None,
        }
    }
}

impl<T: Clone + Default> Field<T> {
    /// The value, or the type's default (an object whose fields are all missing).
    fn or_default(&self) -> T {
        self.get().cloned().unwrap_or_default()
    }
}

impl<T: Clone + Default> Field<Vec<Field<T>>> {
    /// The items of a list (none when it is not one); items that are not objects read as
    /// objects with every field missing.
    fn items(&self) -> Vec<T> {
        self.get()
            .into_iter()
            .flatten()
            .map(Field::or_default)
            .collect()
    }
}

impl Field<f64> {
    /// The number, required: an error naming `key` when it is missing or not a finite number.
    fn num(&self, key: &str) -> Result<f64, String> {
        self.get()
            .copied()
            .filter(|x| x.is_finite())
            .ok_or_else(|| format!("'{key}' is missing or not a finite number"))
    }

    /// The number, NaN when there is none (for tables).
    fn or_nan(&self) -> f64 {
        self.get().copied().unwrap_or(f64::NAN)
    }
}

impl Field<String> {
    /// The text, `?` when there is none (for tables).
    fn text(&self) -> &str {
        self.get().map_or("?", String::as_str)
    }
}

/// The machine of a result.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct MachineView {
    cpu_model: Field<String>,
    cores: Field<u64>,
}

impl MachineView {
    /// Whether the result describes its machine (has a `cpu_model`, whatever it holds).
    fn described(&self) -> bool {
        !matches!(self.cpu_model, Field::Missing)
    }

    /// `CPU (N cores)` for the tables.
    fn describe(&self) -> String {
        format!(
            "{} ({} cores)",
            self.cpu_model.text(),
            self.cores.get().copied().unwrap_or(0)
        )
    }
}

/// The backend of a training or matmul result.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct BackendView {
    backend: Field<String>,
    precision: Field<String>,
}

/// The theoretical peaks of a matmul result.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct TheoreticalView {
    fp32_gflops: Field<f64>,
    int8_gops: Field<f64>,
}

/// One product of a matmul result.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct ProductView {
    weight: Field<String>,
    gflops: Field<f64>,
    verified: Field<bool>,
}

/// One point of a memory result.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct MemoryPointView {
    read_gbs_1t: Field<f64>,
    read_gbs_all: Field<f64>,
    latency_ns: Field<f64>,
}

/// One latency step of a memory result.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct CliffView {
    above_bytes: Field<u64>,
}

/// One backend of a latency result.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct BackendLatencyView {
    backend: Field<String>,
    unavailable: Field<String>,
    points: Field<Vec<Field<LatencyPointView>>>,
}

/// One operation of a latency result.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct LatencyPointView {
    op: Field<String>,
    shape: Field<String>,
    median_ns: Field<f64>,
    min_ns: Field<f64>,
}

/// A benchmark result (`bench ... --json`) as the report reads it: the envelope and the
/// fields of every kind of result (each kind has its own; the others stay missing).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct ResultView {
    schema: Field<String>,
    schema_version: Field<u64>,
    bench: Field<String>,
    machine: Field<MachineView>,
    // train
    model: Field<String>,
    backend: Field<BackendView>,
    batch: Field<u64>,
    seq: Field<u64>,
    median_ms: Field<f64>,
    tokens_per_s: Field<f64>,
    flops_per_step: Field<f64>,
    gflops: Field<f64>,
    peak_gflops: Field<f64>,
    mfu: Field<f64>,
    // generate
    weights: Field<String>,
    prefill_tokens_per_s: Field<f64>,
    prefill_gflops: Field<f64>,
    prefill_peak_gflops: Field<f64>,
    decode_tokens_per_s: Field<f64>,
    roofline_fraction: Field<f64>,
    // matmul
    int8: Field<bool>,
    theoretical: Field<TheoreticalView>,
    fp32_peak_gflops: Field<f64>,
    bf16_peak_gflops: Field<f64>,
    matmuls: Field<Vec<Field<ProductView>>>,
    // memory
    points: Field<Vec<Field<MemoryPointView>>>,
    cliffs: Field<Vec<Field<CliffView>>>,
    // latency
    backends: Field<Vec<Field<BackendLatencyView>>>,
}

impl ResultView {
    /// Reads a result; anything that is not a JSON object reads as one with no fields.
    fn of(v: &Value) -> Self {
        ResultView::deserialize(v).unwrap_or_default()
    }

    fn machine(&self) -> String {
        self.machine.or_default().describe()
    }
}

/// Checks one result; `Ok` with its kind (`train`, ..., `probe`).
pub fn validate(v: &Value) -> Result<String, String> {
    let r = ResultView::of(v);
    if r.schema.get().map(String::as_str) == Some(probe::SCHEMA) {
        validate_probe(v)?;
        return Ok("probe".into());
    }
    if r.schema.get().map(String::as_str) != Some(SCHEMA) {
        return Err(format!(
            "not a handgrad benchmark result (no \"schema\": \"{SCHEMA}\"; write results with --json)"
        ));
    }
    let version = r.schema_version.get().copied().unwrap_or(0);
    if version != SCHEMA_VERSION as u64 {
        return Err(format!(
            "schema version {version}; this build reads {SCHEMA_VERSION}"
        ));
    }
    if !r.machine.or_default().described() {
        return Err("no machine description".into());
    }
    let kind = r.bench.get().map_or("", String::as_str);
    match kind {
        "train" => validate_train(&r)?,
        "generate" => validate_generate(&r)?,
        "matmul" => validate_matmul(&r)?,
        "latency" => validate_latency(&r)?,
        "memory" => validate_memory(&r)?,
        other => return Err(format!("unknown benchmark '{other}'")),
    }
    Ok(kind.to_string())
}

/// A probe result: every figure recomputed, none rejected.
fn validate_probe(v: &Value) -> Result<(), String> {
    let mut r =
        probe::ProbeReport::deserialize(v).map_err(|e| format!("not a probe result: {e}"))?;
    let rejected = probe::validate(&mut r).map_err(|e| e.to_string())?;
    if let Some(bad) = r.results.iter().find_map(|x| x.rejected.clone()) {
        return Err(format!("{rejected} probe results fail validation: {bad}"));
    }
    Ok(())
}

fn validate_train(r: &ResultView) -> Result<(), String> {
    let (gflops, peak, mfu) = (
        r.gflops.num("gflops")?,
        r.peak_gflops.num("peak_gflops")?,
        r.mfu.num("mfu")?,
    );
    let flops = r.flops_per_step.num("flops_per_step")?;
    let ms = r.median_ms.num("median_ms")?;
    if ms <= 0.0 || gflops <= 0.0 || peak <= 0.0 {
        return Err("times and rates must be positive".into());
    }
    // The figures must follow from each other, and stay below the measured peak.
    let implied = flops / (ms / 1e3) / 1e9;
    if (implied - gflops).abs() > 0.25 * gflops {
        return Err(format!(
            "{gflops:.1} GFLOP/s reported, but {flops:.3e} FLOP per step at a median {ms:.2} ms is {implied:.1}"
        ));
    }
    if (mfu - gflops / peak).abs() > 1e-6 {
        return Err(format!(
            "MFU {mfu} is not GFLOP/s / peak = {:.4}",
            gflops / peak
        ));
    }
    if gflops > peak * 1.05 {
        return Err(format!(
            "{gflops:.1} GFLOP/s is above the machine's measured peak of {peak:.1}: impossible"
        ));
    }
    Ok(())
}

fn validate_generate(r: &ResultView) -> Result<(), String> {
    let frac = r.roofline_fraction.num("roofline_fraction")?;
    let decode = r.decode_tokens_per_s.num("decode_tokens_per_s")?;
    if decode <= 0.0 {
        return Err("decode speed must be positive".into());
    }
    // Weights must be read once per token: beating the roofline by much means the bandwidth
    // or the bytes per token are wrong.
    if frac > 1.25 {
        return Err(format!(
            "decoding at {:.0}% of the memory-bandwidth roofline: impossible",
            100.0 * frac
        ));
    }
    // The prompt's pass against the peak measured with it (results that have both).
    if let (Some(&gflops), Some(&peak)) = (r.prefill_gflops.get(), r.prefill_peak_gflops.get())
        && gflops > peak * 1.05
    {
        return Err(format!(
            "prefill at {gflops:.1} GFLOP/s is above the machine's measured peak of {peak:.1}: impossible"
        ));
    }
    Ok(())
}

fn validate_matmul(r: &ResultView) -> Result<(), String> {
    let int8 = r.int8.get().copied().unwrap_or(false);
    let peak = if int8 {
        // int8 products against the theoretical int8 rate (nothing measures it), as
        // `bench matmul --int8` bounds them (null without an int8 instruction).
        let theo = r.theoretical.or_default();
        let gops = match theo.int8_gops {
            Field::Missing | Field::Null => None,
            _ => Some(theo.int8_gops.num("int8_gops")?),
        };
        crate::bench::peak::int8_ceiling(gops, theo.fp32_gflops.num("fp32_gflops")?)
    } else {
        r.fp32_peak_gflops
            .num("fp32_peak_gflops")?
            .max(r.bf16_peak_gflops.get().copied().unwrap_or(0.0))
    };
    for m in r.matmuls.items() {
        let g = m.gflops.num("gflops")?;
        if m.verified.get() == Some(&false) {
            return Err(format!(
                "a product ({}) failed its check against the f64 product",
                m.weight.text()
            ));
        }
        if g > peak * 1.05 {
            return Err(format!(
                "a product at {g:.1} GFLOP/s is above the measured peak {peak:.1}: impossible"
            ));
        }
    }
    Ok(())
}

fn validate_latency(r: &ResultView) -> Result<(), String> {
    for b in r.backends.items() {
        for p in b.points.items() {
            let (med, min) = (p.median_ns.num("median_ns")?, p.min_ns.num("min_ns")?);
            if !(min > 0.0 && min <= med && med.is_finite()) {
                return Err(format!(
                    "latency {min} / {med} ns: the fastest call must be positive and no slower than the median"
                ));
            }
        }
    }
    Ok(())
}

fn validate_memory(r: &ResultView) -> Result<(), String> {
    for p in r.points.items() {
        if p.latency_ns.num("latency_ns")? <= 0.0 || p.read_gbs_1t.num("read_gbs_1t")? <= 0.0 {
            return Err("memory points must be positive".into());
        }
    }
    Ok(())
}

/// The fastest product of a matmul result (GFLOP/s, int8: GOP/s).
pub fn best_product(v: &Value) -> f64 {
    best_of(&ResultView::of(v))
}

fn best_of(r: &ResultView) -> f64 {
    r.matmuls
        .items()
        .iter()
        .filter_map(|m| m.gflops.get().copied())
        .fold(0.0, f64::max)
}

/// What a matmul result's products compute with: `int8`, or the backend's precision.
pub fn products(v: &Value) -> String {
    products_of(&ResultView::of(v))
}

fn products_of(r: &ResultView) -> String {
    if r.int8.get() == Some(&true) {
        "int8".into()
    } else {
        r.backend.or_default().precision.text().to_string()
    }
}

/// A section of the report: a title, a table head and one row (or several lines of rows) per
/// accepted result of its kind.
struct Section {
    kind: &'static str,
    title: &'static str,
    head: &'static str,
    row: fn(&Value) -> String,
}

const SECTIONS: [Section; 6] = [
    Section {
        kind: "train",
        title: "Training step",
        head: "| machine | model | backend | batch x seq | ms / step | tokens/s | GFLOP/s | of the measured peak |\n|---|---|---|---|---|---|---|---|",
        row: train_row,
    },
    Section {
        kind: "generate",
        title: "Generation",
        head: "| machine | model | weights | prefill tokens/s | decode tokens/s | of the bandwidth roofline |\n|---|---|---|---|---|---|",
        row: generate_row,
    },
    Section {
        kind: "matmul",
        title: "Matrix products",
        head: "| machine | products | fp32 peak GFLOP/s | bf16 peak GFLOP/s | best product GFLOP/s (int8: GOP/s) |\n|---|---|---|---|---|",
        row: matmul_row,
    },
    Section {
        kind: "memory",
        title: "Memory",
        head: "| machine | latency steps (working set) | largest set: read GB/s, 1 thread / all | latency ns |\n|---|---|---|---|",
        row: memory_row,
    },
    Section {
        kind: "latency",
        title: "Per-call latency",
        head: "| machine | backend | op | size | median us | fastest us |\n|---|---|---|---|---|---|",
        row: latency_rows,
    },
    Section {
        kind: "probe",
        title: "Neural Engine probes",
        head: "| chip | device | probe | best TFLOPS | rated TOPS |\n|---|---|---|---|---|",
        row: probe_row,
    },
];

fn train_row(v: &Value) -> String {
    let r = ResultView::of(v);
    let backend = r.backend.or_default();
    format!(
        "| {} | {} | {} {} | {} x {} | {:.1} | {:.0} | {:.1} | {:.1}% |",
        r.machine(),
        r.model.text(),
        backend.backend.text(),
        backend.precision.text(),
        r.batch.get().copied().unwrap_or(0),
        r.seq.get().copied().unwrap_or(0),
        r.median_ms.or_nan(),
        r.tokens_per_s.or_nan(),
        r.gflops.or_nan(),
        100.0 * r.mfu.or_nan()
    )
}

fn generate_row(v: &Value) -> String {
    let r = ResultView::of(v);
    format!(
        "| {} | {} | {} | {:.0} | {:.1} | {:.0}% |",
        r.machine(),
        r.model.text(),
        r.weights.text(),
        r.prefill_tokens_per_s.or_nan(),
        r.decode_tokens_per_s.or_nan(),
        100.0 * r.roofline_fraction.or_nan()
    )
}

fn matmul_row(v: &Value) -> String {
    let r = ResultView::of(v);
    format!(
        "| {} | {} | {:.1} | {} | {:.1} |",
        r.machine(),
        products_of(&r),
        r.fp32_peak_gflops.or_nan(),
        r.bf16_peak_gflops
            .get()
            .map_or("-".to_string(), |b| format!("{b:.1}")),
        best_of(&r)
    )
}

fn memory_row(v: &Value) -> String {
    let r = ResultView::of(v);
    let steps: Vec<String> = r
        .cliffs
        .items()
        .iter()
        .map(|c| format!("{} KB", c.above_bytes.get().copied().unwrap_or(0) / 1024))
        .collect();
    let last = r.points.items().pop().unwrap_or_default();
    format!(
        "| {} | {} | {:.1} / {:.1} | {:.1} |",
        r.machine(),
        steps.join(", "),
        last.read_gbs_1t.or_nan(),
        last.read_gbs_all.or_nan(),
        last.latency_ns.or_nan()
    )
}

fn latency_rows(v: &Value) -> String {
    let r = ResultView::of(v);
    let machine = r.machine();
    let mut rows = Vec::new();
    for b in r.backends.items() {
        if let Some(why) = b.unavailable.get() {
            rows.push(format!(
                "| {machine} | {} | not available | {} | | |",
                b.backend.text(),
                why.replace('|', "\\|")
            ));
            continue;
        }
        for p in b.points.items() {
            rows.push(format!(
                "| {machine} | {} | {} | {} | {:.2} | {:.2} |",
                b.backend.text(),
                p.op.text(),
                p.shape.text(),
                p.median_ns.or_nan() / 1e3,
                p.min_ns.or_nan() / 1e3
            ));
        }
    }
    rows.join("\n")
}

fn probe_row(v: &Value) -> String {
    // Accepted probe results are whole probe reports (validation read them).
    let Ok(r) = probe::ProbeReport::deserialize(v) else {
        return String::new();
    };
    let best = r.results.iter().map(|x| x.tflops).fold(0.0, f64::max);
    format!(
        "| {} | {} | {} | {:.3} | {} |",
        r.chip,
        r.device,
        r.probe.name(),
        best,
        r.rated_tops
            .map_or("unknown".to_string(), |t| t.to_string())
    )
}

/// The Markdown report of `files` (`(name, parsed JSON)`), and the files left out.
pub fn report(files: &[(String, Value)]) -> (String, Vec<Rejected>) {
    let mut ok: Vec<(String, &Value)> = Vec::new();
    let mut rejected = Vec::new();
    for (name, v) in files {
        match validate(v) {
            Ok(kind) => ok.push((kind, v)),
            Err(reason) => rejected.push(Rejected {
                file: name.clone(),
                reason,
            }),
        }
    }
    let mut md = String::new();
    let _ = writeln!(md, "# handgrad benchmark report\n");
    let _ = writeln!(
        md,
        "{} result files, {} accepted, {} rejected. Every accepted figure was checked against the machine's own measured peak or roofline (and probe outputs against the CPU).\n",
        files.len(),
        ok.len(),
        rejected.len()
    );
    for section in &SECTIONS {
        write_section(&mut md, section, &ok);
    }
    if !rejected.is_empty() {
        let _ = writeln!(md, "## Rejected\n\n| file | reason |\n|---|---|");
        for r in &rejected {
            let _ = writeln!(md, "| {} | {} |", r.file, r.reason.replace('|', "\\|"));
        }
        md.push('\n');
    }
    (md, rejected)
}

/// Writes a section's table of the accepted results of its kind (nothing when there are none).
fn write_section(md: &mut String, section: &Section, ok: &[(String, &Value)]) {
    let rows: Vec<String> = ok
        .iter()
        .filter(|(k, _)| k == section.kind)
        .map(|(_, v)| (section.row)(v))
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(md, "## {}\n\n{}", section.title, section.head);
    for r in rows {
        let _ = writeln!(md, "{r}");
    }
    md.push('\n');
}
