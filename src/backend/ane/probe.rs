//! Probes of a Neural Engine, as the original system's benchmarks measured them — peak
//! throughput (a chain of 1x1 convolutions), per-call latency over sizes, and throughput
//! against weight size (where the weights stop fitting in on-chip memory) — with what the
//! original lacked: every result is checked against a CPU computation of the same program,
//! and one faster than the chip's rated peak is rejected with the reason (the original's
//! community published figures five times above the hardware's).
//!
//! Programs are built with the MIL builder, compiled and run through the runtime
//! ([`super::runtime`]), so they run on a Mac's Neural Engine or on the fake device (the
//! simulator: correct outputs, meaningless timings).

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::mil::build::{Builder, V};
use super::mil::{Arg, ProgramFiles, Target, TensorType};
use super::runtime::{Binding, LoadedProgram, SharedPlatform};
use crate::error::{Error, Result};

/// The result file's format.
pub const SCHEMA: &str = "handgrad-ane-probe";
pub const SCHEMA_VERSION: u32 = 1;

/// Which probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// Peak fp16 throughput: one program of a chain of `depth` 1x1 convolutions.
    Peak,
    /// Time per evaluation of one 1x1 convolution over sizes.
    Latency,
    /// Throughput against weight size: where it falls, the weights left on-chip memory.
    Sram,
    /// fp16 against W8A8 (int8 weights and activations, per-tensor scales) on the same chains.
    Int8,
}

impl ProbeKind {
    /// The name in result files: `peak`, `latency`, `sram`, `int8`.
    pub fn name(self) -> &'static str {
        match self {
            ProbeKind::Peak => "peak",
            ProbeKind::Latency => "latency",
            ProbeKind::Sram => "sram",
            ProbeKind::Int8 => "int8",
        }
    }
}

/// The arithmetic of a probe program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProbeDtype {
    /// fp16 weights and activations.
    #[default]
    Fp16,
    /// int8 weights (dequantized in the program) and int8 activations (quantized and
    /// dequantized before each convolution).
    Int8,
}

impl ProbeDtype {
    /// The name in result files and tables: `fp16`, `int8`.
    pub fn name(self) -> &'static str {
        match self {
            ProbeDtype::Fp16 => "fp16",
            ProbeDtype::Int8 => "int8",
        }
    }
}

/// One program shape: `depth` convolutions of `channels` x `channels` over `spatial` columns.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProbeCase {
    pub channels: usize,
    pub spatial: usize,
    pub depth: usize,
}

impl ProbeCase {
    /// Multiply-adds count twice: `2 C^2 S` per convolution.
    pub fn flops(&self) -> f64 {
        let (c, s, d) = (self.channels as f64, self.spatial as f64, self.depth as f64);
        2.0 * c * c * s * d
    }

    /// fp16 weight bytes.
    pub fn weight_bytes(&self) -> usize {
        2usize
            .saturating_mul(self.channels)
            .saturating_mul(self.channels)
            .saturating_mul(self.depth)
    }
}

/// The default sweep of a probe.
pub fn default_cases(kind: ProbeKind) -> Vec<ProbeCase> {
    let c = |channels, spatial, depth| ProbeCase {
        channels,
        spatial,
        depth,
    };
    match kind {
        ProbeKind::Peak => vec![
            c(512, 64, 32),
            c(512, 64, 64),
            c(512, 64, 128),
            c(256, 64, 128),
        ],
        ProbeKind::Latency => [64, 128, 256, 512, 1024, 2048]
            .iter()
            .map(|&ch| c(ch, 64, 1))
            .collect(),
        ProbeKind::Sram => [256, 512, 1024, 1536, 2048, 3072, 4096, 6144]
            .iter()
            .map(|&ch| c(ch, 64, 1))
            .collect(),
        ProbeKind::Int8 => vec![
            c(512, 64, 64),
            c(512, 64, 128),
            c(256, 64, 128),
            c(384, 64, 128),
        ],
    }
}

/// One measured case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub case: ProbeCase,
    #[serde(default)]
    pub precision: ProbeDtype,
    pub weight_mb: f64,
    pub flops: f64,
    pub evals: usize,
    pub ms_per_eval: f64,
    pub tflops: f64,
    /// Relative RMS difference of the output from the CPU's.
    pub rel_rms_error: f64,
    /// Set by validation: why this result cannot be right.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
}

/// A probe's result file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub schema: String,
    pub schema_version: u32,
    pub probe: ProbeKind,
    /// `ane` or `ane-fake` (the simulator: timings are not the hardware's).
    pub device: String,
    pub chip: String,
    pub os: String,
    pub handgrad_version: String,
    pub date_unix: u64,
    /// Apple's published Neural Engine figure for the chip (TOPS), when known.
    pub rated_tops: Option<f64>,
    pub results: Vec<ProbeResult>,
    /// For `sram`: the weight size (MB) where throughput first fell below half its best.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cliff_mb: Option<f64>,
}

/// Apple's published Neural Engine TOPS of each chip (an upper bound for any precision).
pub fn rated_tops(chip: &str) -> Option<f64> {
    const TABLE: &[(&str, f64)] = &[
        ("Apple M1 Ultra", 22.0),
        ("Apple M1", 11.0),
        ("Apple M2 Ultra", 31.6),
        ("Apple M2", 15.8),
        ("Apple M3 Ultra", 36.0),
        ("Apple M3", 18.0),
        ("Apple M4", 38.0),
    ];
    TABLE
        .iter()
        .find(|(name, _)| chip.starts_with(name))
        .map(|&(_, t)| t)
}

/// Deterministic weights `[C, C]` per layer, scaled to keep activations of order one.
fn weights(case: &ProbeCase, layer: usize) -> Vec<f32> {
    let c = case.channels;
    let mut rng = crate::util::rng::Rng::new(0x5eed + layer as u64);
    let s = 1.0 / (c as f64).sqrt();
    (0..c * c).map(|_| (rng.normal() * s) as f32).collect()
}

fn input_values(case: &ProbeCase) -> Vec<f32> {
    let mut rng = crate::util::rng::Rng::new(7);
    (0..case.channels * case.spatial)
        .map(|_| rng.normal() as f32)
        .collect()
}

/// Symmetric per-tensor int8 quantization of `w`: values and scale.
fn quantize_weights(w: &[f32]) -> (Vec<i8>, f32) {
    let max = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = round16(if max > 0.0 { max / 127.0 } else { 1.0 });
    let q = w
        .iter()
        .map(|v| (v / scale).round_ties_even().clamp(-128.0, 127.0) as i8)
        .collect();
    (q, scale)
}

fn round16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// The activation scale of each layer's input (max |x| / 127 of the fp16 computation).
fn activation_scales(case: &ProbeCase) -> Vec<f32> {
    let mut scales = Vec::new();
    reference_layers(case, ProbeDtype::Fp16, &[], &mut |x: &[f32]| {
        let max = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        scales.push(round16(if max > 0.0 { max / 127.0 } else { 1.0 }));
    });
    scales
}

/// The program of a case: `x [1, C, 1, S]` through `depth` 1x1 convolutions with weights in
/// weight files (fp16; or int8 dequantized in the program, with the activations quantized to
/// int8 and back before each convolution).
pub fn program(case: &ProbeCase, target: Target) -> Result<ProgramFiles> {
    program_in(case, target, ProbeDtype::Fp16)
}

/// [`program`] in a precision.
pub fn program_in(case: &ProbeCase, target: Target, precision: ProbeDtype) -> Result<ProgramFiles> {
    let act_scales = match precision {
        ProbeDtype::Int8 => activation_scales(case),
        ProbeDtype::Fp16 => Vec::new(),
    };
    let mut b = Builder::new(target);
    let (c, s) = (case.channels, case.spatial);
    let mut x = b.input("x", TensorType::fp16(&[1, c, 1, s]))?;
    let strides = b.ints("conv_strides", &[1, 1])?;
    let pad = b.ints("conv_pad", &[0, 0, 0, 0])?;
    let dil = b.ints("conv_dilations", &[1, 1])?;
    let groups = b.int("conv_groups", 1)?;
    let pad_type = b.string("conv_pad_type", "valid")?;
    let var = |v: &V| Arg::Var(v.0.clone());
    let int8 = if precision == ProbeDtype::Int8 {
        Some(b.string("q_dtype", "int8")?)
    } else {
        None
    };
    for l in 0..case.depth {
        let w = match &int8 {
            None => b.fp16_tensor(&format!("w{l}"), &[c, c, 1, 1], &weights(case, l))?,
            Some(dtype) => {
                let (q, scale) = quantize_weights(&weights(case, l));
                let wq = b.int8_tensor(&format!("wq{l}"), &[c, c, 1, 1], &q)?;
                let ws = b.fp16(&format!("ws{l}"), scale)?;
                let xs = b.fp16(&format!("xs{l}"), act_scales.get(l).copied().unwrap_or(1.0))?;
                let xq = b.call(
                    &format!("xq{l}"),
                    "quantize",
                    vec![
                        ("input", var(&x)),
                        ("scale", var(&xs)),
                        ("output_dtype", var(dtype)),
                    ],
                )?;
                x = b.call(
                    &format!("xd{l}"),
                    "dequantize",
                    vec![("input", var(&xq)), ("scale", var(&xs))],
                )?;
                b.call(
                    &format!("w{l}"),
                    "dequantize",
                    vec![("input", var(&wq)), ("scale", var(&ws))],
                )?
            }
        };
        x = b.call(
            &format!("y{l}"),
            "conv",
            vec![
                ("x", var(&x)),
                ("weight", var(&w)),
                ("strides", var(&strides)),
                ("pad_type", var(&pad_type)),
                ("pad", var(&pad)),
                ("dilations", var(&dil)),
                ("groups", var(&groups)),
            ],
        )?;
    }
    b.output(&x)?;
    Ok(b.finish()?.1)
}

/// The CPU's output of a case (f32, rounding to fp16 between layers as the device stores).
pub fn reference(case: &ProbeCase) -> Vec<f32> {
    reference_in(case, ProbeDtype::Fp16)
}

/// [`reference`] in a precision.
pub fn reference_in(case: &ProbeCase, precision: ProbeDtype) -> Vec<f32> {
    let scales = match precision {
        ProbeDtype::Int8 => activation_scales(case),
        ProbeDtype::Fp16 => Vec::new(),
    };
    reference_layers(case, precision, &scales, &mut |_| {})
}

/// Runs the layers on the CPU, telling `seen` each layer's input.
fn reference_layers(
    case: &ProbeCase,
    precision: ProbeDtype,
    act_scales: &[f32],
    seen: &mut dyn FnMut(&[f32]),
) -> Vec<f32> {
    let (c, s) = (case.channels, case.spatial);
    let round = round16;
    let mut x: Vec<f32> = input_values(case).into_iter().map(round).collect();
    for l in 0..case.depth {
        seen(&x);
        let w: Vec<f32> = match precision {
            ProbeDtype::Fp16 => weights(case, l).into_iter().map(round).collect(),
            ProbeDtype::Int8 => {
                let (q, scale) = quantize_weights(&weights(case, l));
                let xs = act_scales.get(l).copied().unwrap_or(1.0);
                for v in x.iter_mut() {
                    *v = round((*v / xs).round_ties_even().clamp(-128.0, 127.0) * xs);
                }
                q.iter().map(|&v| round(v as f32 * scale)).collect()
            }
        };
        let mut y = vec![0.0f32; c * s];
        for o in 0..c {
            for i in 0..c {
                let wv = w[o * c + i];
                for t in 0..s {
                    y[o * s + t] += wv * x[i * s + t];
                }
            }
        }
        x = y.into_iter().map(round).collect();
    }
    x
}

fn rel_rms(got: &[f32], want: &[f32]) -> f64 {
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (a, b) in got.iter().zip(want) {
        d += ((a - b) as f64).powi(2);
        n += (*b as f64).powi(2);
    }
    if got.len() != want.len() || !d.is_finite() {
        return f64::INFINITY;
    }
    (d / n.max(1e-30)).sqrt()
}

/// Compiles and times one case on `platform`: `warmup` evaluations, then `evals` timed ones.
pub fn run_case(
    platform: &SharedPlatform,
    case: &ProbeCase,
    target: Target,
    precision: ProbeDtype,
    warmup: usize,
    evals: usize,
) -> Result<ProbeResult> {
    let files = program_in(case, target, precision)?;
    let bytes = 2 * case.channels * case.spatial;
    let bind = |n: &str| Binding {
        name: n.into(),
        bytes,
    };
    let out_name = format!("y{}", case.depth - 1);
    let prog = LoadedProgram::new(platform, "probe", &files, &[bind("x")], &[bind(&out_name)])?;
    let input: Vec<u8> = input_values(case)
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let mut out = vec![0u8; bytes];
    for _ in 0..warmup {
        prog.run(&[&input], &mut [&mut out])?;
    }
    let evals = evals.max(1);
    let t0 = Instant::now();
    for _ in 0..evals {
        prog.run(&[&input], &mut [&mut out])?;
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3 / evals as f64;
    let got: Vec<f32> = out
        .chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    let flops = case.flops();
    let weight_bytes = match precision {
        ProbeDtype::Fp16 => case.weight_bytes(),
        ProbeDtype::Int8 => case.weight_bytes() / 2,
    };
    Ok(ProbeResult {
        case: *case,
        precision,
        weight_mb: weight_bytes as f64 / 1e6,
        flops,
        evals,
        ms_per_eval: ms,
        tflops: flops / (ms / 1e3) / 1e12,
        rel_rms_error: rel_rms(&got, &reference_in(case, precision)),
        rejected: None,
    })
}

/// Largest relative RMS error accepted: fp16 storage between layers, fp16 or fp32
/// accumulation inside them.
pub fn tolerance(case: &ProbeCase) -> f64 {
    0.02 * (case.depth as f64).sqrt().max(1.0)
}

/// Why a result cannot be right, if it cannot.
pub fn check(r: &ProbeResult, rated_tops: Option<f64>) -> Option<String> {
    let c = &r.case;
    if c.channels == 0 || c.spatial == 0 || c.depth == 0 {
        return Some("empty case".into());
    }
    let flops = c.flops();
    if (r.flops - flops).abs() > 1e-6 * flops {
        return Some(format!(
            "{} FLOP reported, but {} convolutions of {}x{} over {} columns are {flops} (2 C^2 S per convolution)",
            r.flops, c.depth, c.channels, c.channels, c.spatial
        ));
    }
    if !(r.ms_per_eval.is_finite() && r.ms_per_eval > 0.0) {
        return Some(format!("{} ms per evaluation is not a time", r.ms_per_eval));
    }
    let tflops = flops / (r.ms_per_eval / 1e3) / 1e12;
    if (r.tflops - tflops).abs() > 1e-6 * tflops.max(1e-12) {
        return Some(format!(
            "{} TFLOPS reported, but {flops} FLOP in {} ms is {tflops:.4}",
            r.tflops, r.ms_per_eval
        ));
    }
    if let Some(peak) = rated_tops
        && tflops > peak
    {
        return Some(format!(
            "{tflops:.2} TFLOPS is above the chip's rated {peak} TOPS: impossible (a timing or counting error)"
        ));
    }
    if r.rel_rms_error.is_nan() || r.rel_rms_error > tolerance(c) {
        return Some(format!(
            "the output differs from the CPU's (relative RMS error {:.3e}, tolerance {:.1e}): the device did not compute this program",
            r.rel_rms_error,
            tolerance(c)
        ));
    }
    None
}

/// Validates every result of a report — FLOPs recomputed from the shape, TFLOPS from the
/// time, the rated peak from handgrad's table when the chip is known, the recorded error
/// against the tolerance — marks the rejected ones, and returns how many were rejected.
pub fn validate(report: &mut ProbeReport) -> Result<usize> {
    if report.schema != SCHEMA || report.schema_version != SCHEMA_VERSION {
        return Err(Error::invalid(format!(
            "not a probe result of this version: schema {} v{} (expected {SCHEMA} v{SCHEMA_VERSION})",
            report.schema, report.schema_version
        )));
    }
    let known = rated_tops(&report.chip);
    if let (Some(k), Some(r)) = (known, report.rated_tops)
        && (k - r).abs() > 1e-9
    {
        return Err(Error::invalid(format!(
            "the file gives {} a rated {r} TOPS; Apple's figure is {k}",
            report.chip
        )));
    }
    let peak = known.or(report.rated_tops);
    let mut rejected = 0;
    for r in &mut report.results {
        r.rejected = check(r, peak);
        if r.rejected.is_some() {
            rejected += 1;
        }
    }
    Ok(rejected)
}

/// Where throughput first falls below half of the best before it (the on-chip memory cliff).
pub fn cliff(results: &[ProbeResult]) -> Option<f64> {
    let mut best = 0.0f64;
    for r in results.iter().filter(|r| r.rejected.is_none()) {
        if best > 0.0 && r.tflops < 0.5 * best {
            return Some(r.weight_mb);
        }
        best = best.max(r.tflops);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(case: ProbeCase, ms: f64, err: f64) -> ProbeResult {
        let flops = case.flops();
        ProbeResult {
            case,
            precision: ProbeDtype::Fp16,
            weight_mb: case.weight_bytes() as f64 / 1e6,
            flops,
            evals: 10,
            ms_per_eval: ms,
            tflops: flops / (ms / 1e3) / 1e12,
            rel_rms_error: err,
            rejected: None,
        }
    }

    #[test]
    fn impossible_results_are_rejected_with_the_reason() {
        let c = ProbeCase {
            channels: 512,
            spatial: 64,
            depth: 128,
        };
        // 4.3 GFLOP in 0.5 ms = 8.6 TFLOPS: fine on an M4 (38), too fast for nothing.
        assert_eq!(check(&result(c, 0.5, 1e-3), Some(38.0)), None);
        // 94 TFLOPS on a chip rated 19 or 38: rejected.
        let e = check(&result(c, 0.0457, 1e-3), Some(38.0)).unwrap();
        assert!(e.contains("above the chip's rated 38 TOPS"), "{e}");
        // A wrong output.
        let e = check(&result(c, 0.5, 0.9), Some(38.0)).unwrap();
        assert!(e.contains("differs from the CPU's"), "{e}");
        // A TFLOPS figure that does not follow from the time (the original's %peak slip).
        let mut r = result(c, 0.5, 1e-3);
        r.tflops *= 1000.0;
        assert!(check(&r, None).unwrap().contains("TFLOPS reported"));
        let mut r = result(c, 0.5, 1e-3);
        r.flops /= 2.0;
        assert!(check(&r, None).unwrap().contains("FLOP reported"));
    }

    #[test]
    fn the_int8_program_quantizes_and_its_reference_shows_it() {
        let c = ProbeCase {
            channels: 64,
            spatial: 16,
            depth: 3,
        };
        let (a, b) = (
            reference_in(&c, ProbeDtype::Fp16),
            reference_in(&c, ProbeDtype::Int8),
        );
        let d = rel_rms(&b, &a);
        // Quantization moves the result, by about what 8 bits allow.
        assert!(d > 1e-3 && d < 0.1, "{d}");
        // The simulator runs the emitted int8 program exactly as the reference computes it.
        let files = program_in(&c, Target::Ios18, ProbeDtype::Int8).unwrap();
        assert!(files.text.contains("quantize(") && files.text.contains("tensor<int8"));
        let sim = crate::backend::ane::sim::Simulator::new(&files).unwrap();
        let ty = sim.input_type().clone();
        let out = sim
            .run(&crate::backend::ane::sim::Tensor::new(
                &ty,
                input_values(&c),
            ))
            .unwrap();
        assert!(rel_rms(&out.data, &b) < 1e-3, "{}", rel_rms(&out.data, &b));
    }

    #[test]
    fn chips_have_their_rated_figures() {
        assert_eq!(rated_tops("Apple M1 Max"), Some(11.0));
        assert_eq!(rated_tops("Apple M1 Ultra"), Some(22.0));
        assert_eq!(rated_tops("Apple M4 Pro"), Some(38.0));
        assert_eq!(rated_tops("Intel Xeon"), None);
    }

    #[test]
    fn the_cliff_is_where_throughput_halves() {
        let r = |ch: usize, ms: f64| {
            result(
                ProbeCase {
                    channels: ch,
                    spatial: 64,
                    depth: 1,
                },
                ms,
                0.0,
            )
        };
        let rs = vec![r(256, 0.01), r(1024, 0.1), r(2048, 0.4), r(4096, 4.0)];
        assert_eq!(cliff(&rs), Some(rs[3].weight_mb));
    }
}
