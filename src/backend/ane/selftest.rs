//! Checking the ten kernels on a device: each is compiled and loaded on its own, run on random
//! data, and its output compared with the simulator's on the same input. The backend does this
//! for every kernel it prepares (a kernel that fails runs on the CPU), and `handgrad ane
//! selftest` prints it as a table a Mac user can attach to an issue.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::kernels::Kernel;
use super::pack::Surface;
use super::runtime::{Binding, LoadedProgram, SharedPlatform, Stage};
use super::sim::Simulator;
use crate::backend::kernels::Tolerance;

/// The seed of the random inputs (fixed, so a report can be reproduced).
const SEED: u64 = 0x5e1f_7e57;

/// How one kernel fared on a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelCheck {
    pub kernel: String,
    /// Input and output surfaces `[channels, width]`.
    pub input: (usize, usize),
    pub output: (usize, usize),
    pub compiled: bool,
    pub loaded: bool,
    /// Largest difference from the simulator over its largest value.
    pub max_rel_error: Option<f64>,
    /// Median time of one evaluation on the device, input written and output read.
    pub device_ms: Option<f64>,
    /// `ok`, or why the kernel cannot run on this device.
    pub verdict: String,
    /// Whether the kernel can run on the device.
    pub ok: bool,
}

/// A runtime error without the backend's prefix (the caller names the backend and kernel).
fn device_error(e: &crate::error::Error, kernel: &str) -> String {
    let s = e.to_string();
    let s = s.strip_prefix("backend ane: ").unwrap_or(&s);
    s.strip_prefix(&format!("{kernel}: "))
        .unwrap_or(s)
        .to_string()
}

/// The bindings of a kernel's one input and one output.
fn bindings(k: &Kernel, sim: &Simulator) -> (Vec<Binding>, Vec<Binding>) {
    let input = sim.program.inputs.first().map_or("x", |(n, _)| n.as_str());
    let output = sim.program.outputs.first().map_or("out", |n| n.as_str());
    (
        vec![Binding {
            name: input.to_string(),
            bytes: k.input_bytes(),
        }],
        vec![Binding {
            name: output.to_string(),
            bytes: k.output_bytes(),
        }],
    )
}

/// The simulator's output and the device's for the kernel's random input, and the device's
/// evaluation times.
fn compare(
    program: &LoadedProgram,
    k: &Kernel,
    sim: &Simulator,
    runs: usize,
) -> Result<(f64, f64), String> {
    let input = super::random_input(k, SEED);
    let bytes = input.to_bytes();
    let want = sim.run(&input.to_tensor())?;
    let mut out = vec![0u8; k.output_bytes()];
    let mut times = Vec::new();
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        program
            .run(&[&bytes], &mut [&mut out])
            .map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let got = Surface::from_bytes(k.output.0, k.output.1, &out)
        .ok_or("the output has the wrong size")?
        .to_tensor();
    Ok((
        super::relative_error(&got.data, &want.data),
        times[times.len() / 2],
    ))
}

/// Compiles, loads and checks one kernel; returns the loaded program, or why the kernel must
/// run on the CPU: the device's error, or a first evaluation that disagrees with the
/// simulator beyond the fp16 tolerance.
pub fn load_and_verify(
    platform: &SharedPlatform,
    k: &Kernel,
    sim: &Simulator,
) -> Result<LoadedProgram, String> {
    let (ins, outs) = bindings(k, sim);
    let program = LoadedProgram::new(platform, k.kind.name(), &k.files, &ins, &outs)
        .map_err(|e| device_error(&e, k.kind.name()))?;
    let (err, _) = compare(&program, k, sim, 1)?;
    if err > Tolerance::FP16.rel {
        return Err(format!(
            "its first evaluation differs from the simulator by {err:.3e} of the largest value (tolerance {:.0e})",
            Tolerance::FP16.rel
        ));
    }
    Ok(program)
}

/// Checks one kernel on a device for the self-test, timing `runs` evaluations.
pub fn check_kernel(platform: &SharedPlatform, k: &Kernel, runs: usize) -> KernelCheck {
    let mut c = KernelCheck {
        kernel: k.kind.name().to_string(),
        input: k.input,
        output: k.output,
        compiled: false,
        loaded: false,
        max_rel_error: None,
        device_ms: None,
        verdict: String::new(),
        ok: false,
    };
    let sim = match Simulator::new(&k.files) {
        Ok(s) => s,
        Err(e) => {
            c.verdict = format!("the simulator rejects the program: {e}");
            return c;
        }
    };
    let (ins, outs) = bindings(k, &sim);
    let program = match LoadedProgram::new_staged(platform, k.kind.name(), &k.files, &ins, &outs) {
        Ok(p) => p,
        Err((stage, e)) => {
            c.compiled = !matches!(stage, Stage::Create | Stage::Compile);
            c.loaded = matches!(stage, Stage::Bind);
            c.verdict = device_error(&e, k.kind.name());
            return c;
        }
    };
    (c.compiled, c.loaded) = (true, true);
    match compare(&program, k, &sim, runs) {
        Ok((err, ms)) => {
            c.max_rel_error = Some(err);
            c.device_ms = Some(ms);
            c.ok = err <= Tolerance::FP16.rel;
            c.verdict = if c.ok {
                "ok".into()
            } else {
                format!(
                    "differs from the simulator by {err:.3e} (tolerance {:.0e})",
                    Tolerance::FP16.rel
                )
            };
        }
        Err(e) => c.verdict = format!("evaluate: {e}"),
    }
    c
}
