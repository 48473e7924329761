//! The Apple Neural Engine backend: MIL programs for the ten dynamic-weight kernels
//! ([`kernels`]), the program language ([`mil`]), a simulator that runs the emitted text with
//! fp16 numerics ([`sim`]), a lint of the hardware's known rules and of the op forms proven on
//! the chip ([`lint`], [`forms`]), the surface packing ([`pack`]), the runtime that compiles and
//! runs the programs on the device through Apple's private API ([`runtime`]), probes of the
//! chip ([`probe`]) and the self-test of the kernels on a device ([`selftest`]).
//!
//! [`AneKernels`] runs the ten kernels — in the simulator (`--backend ane-sim`), on the Neural
//! Engine (`--backend ane`), or through the runtime against its fake device (`ane-fake`, for
//! tests) — and everything else on the CPU, as the original split the work: embedding,
//! RMSNorms, residual adds (in f32), SwiGLU and RoPE backward, Qwen3's q/k-norm backward, the
//! sums of key/value gradients over each GQA group, every weight gradient, the classifier and
//! loss, and AdamW. Shapes the kernels were not prepared for (decoding one token, a prompt) fall
//! back to the CPU compositions.
//!
//! **Per-kernel placement.** On a device each kernel is compiled, loaded and run once on random
//! data against the simulator when the backend is prepared; a kernel the device rejects, or
//! whose results disagree with the simulator beyond the fp16 tolerance, runs on the CPU instead
//! (one warning naming it and the device's error); `strict` makes that an error.
//!
//! **Staging.** The weights of each layer are written into surfaces of their own once per
//! optimizer update (when the caller tracks its weights, see [`Kernels::weights_changed`]);
//! every call then writes only its activation columns.

pub mod forms;
pub mod kernels;
pub mod lint;
pub mod mil;
pub mod pack;
pub mod probe;
pub mod runtime;
pub mod selftest;
pub mod sim;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use self::kernels::{Kernel, KernelKind, KernelShape, Slab, build_all};
use self::lint::{Finding, Severity};
use self::mil::Target;
use self::pack::Surface;
use self::runtime::RowWrite;
use self::sim::Simulator;
use super::blocks::{Attend, AttentionActs, AttentionWeights, FfnForward, FfnWeights, SdpaForward};
use super::kernels::{AcceleratorStats, KernelPlacement, Kernels, Tolerance};
use super::types::{AttentionShape, Matrix, Qkv, QkvGrads, StepShape};
use crate::error::{Error, Result};

/// How a prepared kernel runs.
enum Exec {
    /// In handgrad's simulator.
    Sim(Simulator),
    /// Compiled and loaded on a device (the Neural Engine, or the runtime's fake).
    Device(Mutex<runtime::LoadedProgram>),
}

/// One kernel ready to run.
struct Prepared {
    kernel: Kernel,
    exec: Exec,
}

/// The input surface of one kernel for one layer (its weights), kept between calls.
struct Staged {
    /// The weights version written into it (`None`: none yet).
    version: Option<u64>,
    /// The simulator's copy of the whole surface.
    host: Option<Surface>,
    /// The device's binding set holding it.
    set: usize,
}

/// The kernels of one step shape.
struct KernelSet {
    shape: StepShape,
    /// The kernels that run as programs (the others run on the CPU).
    kernels: HashMap<KernelKind, Prepared>,
    /// Kernels on the CPU instead, with why.
    fallbacks: Vec<(KernelKind, String)>,
    findings: Vec<(KernelKind, Finding)>,
    /// Staged input surfaces by kernel and layer (the address of its first weight matrix).
    staged: Mutex<HashMap<(KernelKind, usize), Staged>>,
}

/// Where the kernels run.
enum Runner {
    Simulator,
    Device {
        platform: runtime::SharedPlatform,
        /// The backend's name in messages (`ane`, `ane-fake`).
        name: &'static str,
    },
}

/// Choices about a Neural Engine backend that do not change its numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AneOptions {
    /// A kernel the device rejects is an error instead of running on the CPU.
    pub strict: bool,
    /// Write the weights into the surfaces on every call, as before staging (for comparing
    /// the bytes moved).
    pub restage_every_call: bool,
}

/// What the backend measured since it was last asked.
#[derive(Debug, Default)]
struct Counters {
    kernel_ns: u64,
    block_ns: u64,
    bytes: u64,
    weight_bytes: u64,
    calls: u64,
}

/// The ten kernels as MIL programs (in the simulator or on a device), the rest on the CPU.
pub struct AneKernels {
    target: Target,
    set: Option<KernelSet>,
    runner: Runner,
    /// The compile budget a device draws on (the process's unless given).
    budget: Option<std::sync::Arc<runtime::CompileBudget>>,
    options: AneOptions,
    /// The weights version the caller is at; 0 while it does not track its weights (then they
    /// are written on every call).
    version: AtomicU64,
    counters: Mutex<Counters>,
}

fn sim_err(kind: KernelKind, e: String) -> Error {
    Error::backend("ane-sim", format!("{}: {e}", kind.name()))
}

/// The relative difference of two outputs: the largest absolute difference over the largest
/// absolute reference value.
pub fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    let scale = want
        .iter()
        .fold(0f64, |m, &v| m.max(v.abs() as f64))
        .max(1e-30);
    let diff = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    // `f64::max` drops NaN: a non-finite output is caught here.
    if got.len() != want.len() || !diff.is_finite() || got.iter().any(|v| !v.is_finite()) {
        f64::INFINITY
    } else {
        diff / scale
    }
}

impl AneKernels {
    /// `--backend ane-sim`: programs of `target` in the simulator.
    pub fn simulator(target: Target) -> Self {
        Self::with_runner(target, Runner::Simulator)
    }

    /// Programs of `target` compiled and run on a device through the runtime.
    pub fn device(
        platform: Box<dyn runtime::AnePlatform>,
        target: Target,
        name: &'static str,
    ) -> Self {
        Self::with_runner(
            target,
            Runner::Device {
                platform: std::sync::Arc::new(Mutex::new(platform)),
                name,
            },
        )
    }

    fn with_runner(target: Target, runner: Runner) -> Self {
        AneKernels {
            target,
            set: None,
            runner,
            budget: None,
            options: AneOptions::default(),
            version: AtomicU64::new(0),
            counters: Mutex::new(Counters::default()),
        }
    }

    /// Draws compiles from `budget` instead of the process's (tests).
    pub fn with_budget(mut self, budget: std::sync::Arc<runtime::CompileBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Sets the options.
    pub fn with_options(mut self, options: AneOptions) -> Self {
        self.options = options;
        self
    }

    /// Whether the kernel set in use is the one of `shape`.
    pub fn is_prepared_for(&self, shape: &StepShape) -> bool {
        self.set.as_ref().is_some_and(|s| s.shape == *shape)
    }

    fn backend_name(&self) -> &'static str {
        match &self.runner {
            Runner::Simulator => "ane-sim",
            Runner::Device { name, .. } => name,
        }
    }

    /// The prepared set when `rows` token rows are whole sequences of its shape.
    fn set_for(&self, rows: usize) -> Option<&KernelSet> {
        self.set
            .as_ref()
            .filter(|s| rows > 0 && rows.is_multiple_of(s.shape.seq) && rows <= s.shape.rows())
    }

    /// The prepared set for `rows` rows when `kind` runs as a program there.
    fn program_set(&self, rows: usize, kind: KernelKind) -> Option<&KernelSet> {
        self.set_for(rows).filter(|s| s.kernels.contains_key(&kind))
    }

    fn count(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut self.counters.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Runs a kernel whose whole input is activations (written in full).
    fn run_whole(&self, set: &KernelSet, kind: KernelKind, input: &Surface) -> Result<Surface> {
        let p = set.kernels.get(&kind).ok_or_else(|| {
            Error::backend(
                self.backend_name(),
                format!("{} is not prepared", kind.name()),
            )
        })?;
        self.count(|c| c.bytes += input.bytes() as u64);
        let t = Instant::now();
        let out = match &p.exec {
            Exec::Sim(sim) => {
                let out = sim.run(&input.to_tensor()).map_err(|e| sim_err(kind, e))?;
                Surface::from_tensor(&out).ok_or_else(|| {
                    sim_err(
                        kind,
                        "the output is not an fp16 [1, C, 1, S] surface".into(),
                    )
                })?
            }
            Exec::Device(program) => {
                let program = program.lock().unwrap_or_else(|e| e.into_inner());
                let (c, w) = p.kernel.output;
                let mut out = vec![0u8; 2 * c * w];
                program.write_input_rows(
                    0,
                    0,
                    RowWrite {
                        offset: 0,
                        row_len: input.bytes(),
                        stride: input.bytes(),
                    },
                    &input.to_bytes(),
                )?;
                program.evaluate_set(0, &mut [&mut out])?;
                self.output_surface(kind, c, w, &out)?
            }
        };
        self.count(|c| {
            c.kernel_ns += t.elapsed().as_nanos() as u64;
            c.calls += 1;
        });
        Ok(out)
    }

    fn output_surface(
        &self,
        kind: KernelKind,
        c: usize,
        w: usize,
        bytes: &[u8],
    ) -> Result<Surface> {
        Surface::from_bytes(c, w, bytes).ok_or_else(|| {
            Error::backend(
                self.backend_name(),
                format!("{}: bad output size", kind.name()),
            )
        })
    }

    /// Runs a kernel with weights: its activation slabs are written on every call, its weight
    /// slabs into the surfaces of this layer (`layer`, the address of its first weight matrix)
    /// only when the weights changed since they were last written there.
    fn run_staged(
        &self,
        set: &KernelSet,
        kind: KernelKind,
        layer: usize,
        acts: &[(&str, Fill)],
        weights: &[(&str, Fill)],
    ) -> Result<Surface> {
        let p = set.kernels.get(&kind).ok_or_else(|| {
            Error::backend(
                self.backend_name(),
                format!("{} is not prepared", kind.name()),
            )
        })?;
        let k = &p.kernel;
        let version = self.version.load(Ordering::SeqCst);
        let mut staged = set.staged.lock().unwrap_or_else(|e| e.into_inner());
        if !staged.contains_key(&(kind, layer)) {
            let s = match &p.exec {
                Exec::Sim(_) => Staged {
                    version: None,
                    host: Some(Surface::new(k.input.0, k.input.1)),
                    set: 0,
                },
                Exec::Device(program) => {
                    let mut program = program.lock().unwrap_or_else(|e| e.into_inner());
                    // Layers take the sets made at `prepare` in the order they first run;
                    // another set of weights (another model's) gets a new one.
                    let used = staged.keys().filter(|(kk, _)| *kk == kind).count();
                    let set = if used < program.sets() {
                        used
                    } else {
                        program.add_set()?
                    };
                    Staged {
                        version: None,
                        host: None,
                        set,
                    }
                }
            };
            staged.insert((kind, layer), s);
        }
        let entry = staged
            .get_mut(&(kind, layer))
            .ok_or_else(|| Error::backend(self.backend_name(), "a staged surface went missing"))?;
        let write_weights =
            version == 0 || entry.version != Some(version) || self.options.restage_every_call;
        let mut to_write: Vec<(&Slab, &Fill)> = Vec::new();
        for (name, fill) in acts {
            to_write.push((slab(k, name)?, fill));
        }
        if write_weights {
            for (name, fill) in weights {
                to_write.push((slab(k, name)?, fill));
            }
        }
        let (ch, width) = k.input;
        let mut bytes = 0u64;
        let mut weight_bytes = 0u64;
        for (i, (s, fill)) in to_write.iter().enumerate() {
            let b = (2 * ch * s.len) as u64;
            bytes += b;
            if i >= acts.len() {
                weight_bytes += b;
            }
            match (&p.exec, entry.host.as_mut()) {
                (Exec::Sim(_), Some(host)) => fill.apply(host, s.start),
                (Exec::Device(program), _) => {
                    let mut scratch = Surface::new(ch, s.len);
                    fill.apply(&mut scratch, 0);
                    let program = program.lock().unwrap_or_else(|e| e.into_inner());
                    program.write_input_rows(
                        entry.set,
                        0,
                        RowWrite {
                            offset: 2 * s.start,
                            row_len: 2 * s.len,
                            stride: 2 * width,
                        },
                        &scratch.to_bytes(),
                    )?;
                }
                (Exec::Sim(_), None) => {
                    return Err(Error::backend(
                        "ane-sim",
                        "a staged surface without its copy",
                    ));
                }
            }
        }
        if write_weights {
            entry.version = Some(version);
        }
        self.count(|c| {
            c.bytes += bytes;
            c.weight_bytes += weight_bytes;
        });
        let t = Instant::now();
        let out = match (&p.exec, entry.host.as_ref()) {
            (Exec::Sim(sim), Some(host)) => {
                let out = sim.run(&host.to_tensor()).map_err(|e| sim_err(kind, e))?;
                Surface::from_tensor(&out).ok_or_else(|| {
                    sim_err(
                        kind,
                        "the output is not an fp16 [1, C, 1, S] surface".into(),
                    )
                })?
            }
            (Exec::Device(program), _) => {
                let program = program.lock().unwrap_or_else(|e| e.into_inner());
                let (c, w) = k.output;
                let mut out = vec![0u8; 2 * c * w];
                program.evaluate_set(entry.set, &mut [&mut out])?;
                self.output_surface(kind, c, w, &out)?
            }
            (Exec::Sim(_), None) => {
                return Err(Error::backend(
                    "ane-sim",
                    "a staged surface without its copy",
                ));
            }
        };
        self.count(|c| {
            c.kernel_ns += t.elapsed().as_nanos() as u64;
            c.calls += 1;
        });
        Ok(out)
    }

    fn kernel<'a>(&self, set: &'a KernelSet, kind: KernelKind) -> Result<&'a Kernel> {
        set.kernels.get(&kind).map(|p| &p.kernel).ok_or_else(|| {
            Error::backend(
                self.backend_name(),
                format!("{} is not prepared", kind.name()),
            )
        })
    }

    /// Times a block: what is not kernel time is staging (packing, conversion, copies).
    fn block<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let t = Instant::now();
        let r = f();
        self.count(|c| c.block_ns += t.elapsed().as_nanos() as u64);
        r
    }

    /// Which of the ten kernels run where (empty before `prepare`).
    pub fn kernel_placement(&self) -> Vec<KernelPlacement> {
        let Some(set) = &self.set else {
            return Vec::new();
        };
        KernelKind::ALL
            .iter()
            .map(|&k| {
                let fallback = set.fallbacks.iter().find(|(f, _)| *f == k);
                KernelPlacement {
                    kernel: k.name().to_string(),
                    on: if fallback.is_some() {
                        "cpu".to_string()
                    } else {
                        self.backend_name().to_string()
                    },
                    reason: fallback.map(|(_, why)| why.clone()),
                }
            })
            .collect()
    }
}

/// The input slab of a kernel by name.
fn slab<'a>(k: &'a Kernel, name: &str) -> Result<&'a Slab> {
    k.input_slabs
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| Error::backend("ane", format!("{} has no input slab {name}", k.kind.name())))
}

/// What goes into a slab of an input surface (at its first column).
enum Fill<'a> {
    /// Token-major rows `x [S, c]`, transposed into channels `0..c`.
    Rows { x: &'a [f32], c: usize },
    /// The transpose of `w [n, c]`: channel `i`, column `k` gets `w[k, i]`.
    MatrixT { w: &'a [f32], n: usize, c: usize },
    /// A matrix `m [c, n]` as it is.
    Matrix { m: &'a [f32], c: usize, n: usize },
    /// Gains (Qwen3's q/k norm), each repeated along its channel over `s` columns.
    Repeated { v: &'a [f32], s: usize },
}

impl Fill<'_> {
    fn apply(&self, dst: &mut Surface, col: usize) {
        match *self {
            Fill::Rows { x, c } => dst.put_rows(0, col, x, x.len() / c.max(1), c),
            Fill::MatrixT { w, n, c } => dst.put_matrix_t(0, col, w, n, c),
            Fill::Matrix { m, c, n } => dst.put_matrix(0, col, m, c, n),
            Fill::Repeated { v, s } => dst.put_repeated(0, col, v, s),
        }
    }
}

/// `1/rms` of each `width`-row of `x` (the q/k norm's saved state, from the kernel's q_raw).
fn rstd_rows(x: &[f32], width: usize, eps: f32, out: &mut [f32]) {
    for (r, row) in out.iter_mut().zip(x.chunks_exact(width)) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
        *r = 1.0 / (ms + eps).sqrt();
    }
}

/// Random inputs of a kernel for checking it on a device: activations in `[-1, 1)` and weight
/// slabs scaled by `1/sqrt(channels)` like an initialised model, so that no value overflows
/// fp16.
pub fn random_input(k: &Kernel, seed: u64) -> Surface {
    let mut rng = crate::util::rng::Rng::new(seed);
    let (c, w) = k.input;
    let mut s = Surface::new(c, w);
    let weight_cols: Vec<(usize, usize)> = k
        .input_slabs
        .iter()
        .filter(|x| x.kind == kernels::SlabKind::Weight)
        .map(|x| (x.start, x.start + x.len))
        .collect();
    let scale = 1.0 / (c as f64).sqrt();
    for ch in 0..c {
        for col in 0..w {
            let u = 2.0 * rng.uniform() - 1.0;
            let weight = weight_cols.iter().any(|&(a, b)| col >= a && col < b);
            let v = if weight { u * scale } else { u };
            s.data[ch * w + col] = half::f16::from_f64(v);
        }
    }
    s
}

impl Kernels for AneKernels {
    fn needs_loss_scaling(&self) -> bool {
        true
    }

    fn prepare(&mut self, shape: &StepShape) -> Result<()> {
        let ks = KernelShape {
            dims: shape.dims,
            seq: shape.seq,
            target: self.target,
        };
        let built = build_all(&ks)?;
        // A device compiles the whole set, within the process's compile budget; the set in
        // use is replaced only once the new one is ready.
        if let Runner::Device { .. } = &self.runner {
            match &self.budget {
                Some(b) => b.reserve(built.len())?,
                None => runtime::COMPILE_BUDGET.reserve(built.len())?,
            }
        }
        let mut kernels = HashMap::new();
        let mut findings = Vec::new();
        let mut fallbacks = Vec::new();
        for kernel in built {
            // The simulator parses the emitted text back (the emitter is tested too) and the
            // lint reads the parsed program.
            let sim = Simulator::new(&kernel.files).map_err(|e| sim_err(kernel.kind, e))?;
            for f in lint::lint(&sim.program, &kernel.files) {
                findings.push((kernel.kind, f));
            }
            let exec = match &self.runner {
                Runner::Simulator => Exec::Sim(sim),
                Runner::Device { platform, name } => {
                    let loaded = selftest::load_and_verify(platform, &kernel, &sim).and_then(
                        |mut program| {
                            // The surfaces of every layer's weights, made now: a device that
                            // cannot hold them says so before the run starts.
                            if kernel.kind.has_weights() {
                                for _ in 1..shape.dims.n_layers {
                                    program.add_set().map_err(|e| e.to_string())?;
                                }
                            }
                            Ok(program)
                        },
                    );
                    match loaded {
                        Ok(program) => Exec::Device(Mutex::new(program)),
                        Err(why) => {
                            if self.options.strict {
                                return Err(Error::backend(
                                    *name,
                                    format!(
                                        "{} would run on the CPU (--ane-strict forbids it): {why}",
                                        kernel.kind.name()
                                    ),
                                ));
                            }
                            fallbacks.push((kernel.kind, why));
                            continue;
                        }
                    }
                }
            };
            kernels.insert(kernel.kind, Prepared { kernel, exec });
        }
        // The two backward attention kernels work as a pair.
        for (a, b) in [
            (KernelKind::SdpaBwd1, KernelKind::SdpaBwd2),
            (KernelKind::SdpaBwd2, KernelKind::SdpaBwd1),
        ] {
            if fallbacks.iter().any(|(k, _)| *k == a) && kernels.remove(&b).is_some() {
                fallbacks.push((b, format!("runs with {} on the CPU", a.name())));
            }
        }
        fallbacks.sort_by_key(|(k, _)| *k);
        self.set = Some(KernelSet {
            shape: *shape,
            kernels,
            fallbacks,
            findings,
            staged: Mutex::new(HashMap::new()),
        });
        Ok(())
    }

    fn warnings(&self) -> Vec<String> {
        let Some(set) = &self.set else {
            return Vec::new();
        };
        let mut out: Vec<String> = set
            .fallbacks
            .iter()
            .map(|(k, why)| {
                format!(
                    "{}: {} runs on the CPU instead: {why}",
                    self.backend_name(),
                    k.name()
                )
            })
            .collect();
        // One line per form not yet run on the chip, with the op, its form and the kernels.
        let mut forms: Vec<(&str, Vec<&str>)> = Vec::new();
        for (kind, f) in set
            .findings
            .iter()
            .filter(|(_, f)| f.rule.id == lint::UNPROVEN_FORM.id)
        {
            let form = f
                .message
                .trim_end_matches(" is not yet run on the Neural Engine");
            match forms.iter_mut().find(|(g, _)| *g == form) {
                Some((_, ks)) if !ks.contains(&kind.name()) => ks.push(kind.name()),
                Some(_) => {}
                None => forms.push((form, vec![kind.name()])),
            }
        }
        out.extend(forms.into_iter().map(|(form, ks)| {
            format!(
                "{}: {} {form} ({}): not yet run on the Neural Engine; if the device rejects it, that kernel runs on the CPU",
                self.backend_name(),
                lint::UNPROVEN_FORM.id,
                ks.join(", ")
            )
        }));
        // One line per other rule, with the kernels it concerns.
        let mut by_rule: Vec<(lint::Rule, Severity, Vec<&str>)> = Vec::new();
        for (kind, f) in set
            .findings
            .iter()
            .filter(|(_, f)| f.rule.id != lint::UNPROVEN_FORM.id)
        {
            match by_rule.iter_mut().find(|(r, _, _)| r.id == f.rule.id) {
                Some((_, sev, ks)) => {
                    *sev = (*sev).max(f.severity);
                    if !ks.contains(&kind.name()) {
                        ks.push(kind.name());
                    }
                }
                None => by_rule.push((f.rule, f.severity, vec![kind.name()])),
            }
        }
        out.extend(by_rule.into_iter().map(|(rule, sev, ks)| {
            let what = if sev == Severity::Error {
                "would fail or compute wrong results on a chip"
            } else {
                "may not compile on some chips"
            };
            match self.runner {
                Runner::Simulator => format!(
                    "ane-sim: {} {} ({}): {what} (the simulator runs them as written)",
                    rule.id,
                    rule.title,
                    ks.join(", ")
                ),
                Runner::Device { name, .. } => format!(
                    "{name}: {} {} ({}): {what}",
                    rule.id,
                    rule.title,
                    ks.join(", ")
                ),
            }
        }));
        out
    }

    fn placement(&self) -> Vec<KernelPlacement> {
        self.kernel_placement()
    }

    fn workspace_bytes(&self, shape: &StepShape) -> usize {
        // One input surface per kernel with weights and layer (staged weights), one per kernel
        // without; one output surface per kernel; and the CPU's own buffers.
        let ks = KernelShape {
            dims: shape.dims,
            seq: shape.seq,
            target: self.target,
        };
        let cpu = {
            let d = &shape.dims;
            let widest = shape.vocab_out.max(d.ffn_dim).max(d.q_dim()).max(d.dim);
            4 * 1024 * widest
        };
        let Ok(all) = build_all(&ks) else {
            return cpu;
        };
        cpu + all
            .iter()
            .map(|k| {
                let copies = if k.kind.has_weights() {
                    shape.dims.n_layers
                } else {
                    1
                };
                copies * k.input_bytes() + k.output_bytes()
            })
            .sum::<usize>()
    }

    fn track_weights(&self) {
        let _ = self
            .version
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst);
    }

    fn weights_changed(&self) {
        let _ = self
            .version
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| Some(v.max(1) + 1));
    }

    fn take_accelerator_stats(&self) -> Option<AcceleratorStats> {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let s = AcceleratorStats {
            kernel_ms: c.kernel_ns as f64 / 1e6,
            staging_ms: c.block_ns.saturating_sub(c.kernel_ns) as f64 / 1e6,
            bytes_staged: c.bytes,
            weight_bytes_staged: c.weight_bytes,
            calls: c.calls,
        };
        *c = Counters::default();
        Some(s)
    }

    fn attention_saved_len(&self, _shape: &AttentionShape) -> usize {
        // sdpaBwd1 recomputes the probabilities from q and k.
        0
    }

    fn tolerance(&self) -> Tolerance {
        Tolerance::FP16
    }

    fn attention_forward(
        &self,
        out: &mut [f32],
        saved: &mut [f32],
        x: Qkv,
        s: &AttentionShape,
    ) -> Result<()> {
        // Nothing is saved here; the CPU kernel needs room for the probabilities.
        if saved.len() >= s.probs_len() {
            crate::backend::cpu::attention::attention_forward(out, saved, x, s);
        } else {
            let mut probs = vec![0.0; s.probs_len()];
            crate::backend::cpu::attention::attention_forward(out, &mut probs, x, s);
        }
        Ok(())
    }

    fn attention_backward(
        &self,
        g: QkvGrads,
        dout: &[f32],
        saved: &[f32],
        x: Qkv,
        s: &AttentionShape,
    ) -> Result<()> {
        if saved.len() >= s.probs_len() {
            crate::backend::cpu::attention::attention_backward(g, dout, saved, x, s);
            return Ok(());
        }
        let mut probs = vec![0.0; s.probs_len()];
        let mut scratch = vec![0.0; s.rows() * s.q_dim()];
        crate::backend::cpu::attention::attention_forward(&mut scratch, &mut probs, x, s);
        crate::backend::cpu::attention::attention_backward(g, dout, &probs, x, s);
        Ok(())
    }

    fn sdpa_forward(&self, a: SdpaForward) -> Result<()> {
        let (batch, seq) = match &a.attend {
            Attend::Causal { batch, seq } => (*batch, *seq),
            Attend::Cached { .. } | Attend::Batched { .. } => {
                return super::kernels::sdpa_forward(self, a);
            }
        };
        // The programs fuse the projections with what follows them: a low-rank term added
        // between the two runs the composition on the CPU.
        if a.delta.is_some() {
            return super::kernels::sdpa_forward(self, a);
        }
        let set = match self.program_set(batch * seq, KernelKind::SdpaFwd) {
            Some(s) if s.shape.seq == seq => s,
            _ => return super::kernels::sdpa_forward(self, a),
        };
        self.block(|| {
            let d = a.dims;
            let (dim, qd, kvd, hd) = (d.dim, d.q_dim(), d.kv_dim(), d.head_dim);
            let k = self.kernel(set, KernelKind::SdpaFwd)?;
            let (w, acts) = (a.w, a.acts);
            let mut weights = vec![
                (
                    "wq",
                    Fill::MatrixT {
                        w: w.wq.f32,
                        n: qd,
                        c: dim,
                    },
                ),
                (
                    "wk",
                    Fill::MatrixT {
                        w: w.wk.f32,
                        n: kvd,
                        c: dim,
                    },
                ),
                (
                    "wv",
                    Fill::MatrixT {
                        w: w.wv.f32,
                        n: kvd,
                        c: dim,
                    },
                ),
            ];
            if let (Some(q), Some(kn)) = (w.q_norm, w.k_norm) {
                weights.push(("q_norm", Fill::Repeated { v: q, s: seq }));
                weights.push(("k_norm", Fill::Repeated { v: kn, s: seq }));
            }
            let layer = w.wq.f32.as_ptr() as usize;
            for b in 0..batch {
                let rows = b * seq..(b + 1) * seq;
                let xn = &a.xn[rows.start * dim..rows.end * dim];
                let out = self.run_staged(
                    set,
                    KernelKind::SdpaFwd,
                    layer,
                    &[("xn", Fill::Rows { x: xn, c: dim })],
                    &weights,
                )?;
                let get = |name: &str, dst: &mut [f32], c: usize| {
                    out.get_rows(
                        k.slab(name),
                        0,
                        &mut dst[rows.start * c..rows.end * c],
                        seq,
                        c,
                    )
                };
                get("attn", &mut acts.att, qd);
                get("q", &mut acts.q, qd);
                get("k", &mut acts.k, kvd);
                get("v", &mut acts.v, kvd);
                if d.qk_norm {
                    get("q_raw", &mut acts.q_raw, qd);
                    get("k_raw", &mut acts.k_raw, kvd);
                }
            }
            if d.qk_norm {
                rstd_rows(&acts.q_raw, hd, d.norm_eps, &mut acts.rstd_q);
                rstd_rows(&acts.k_raw, hd, d.norm_eps, &mut acts.rstd_k);
            }
            Ok(())
        })
    }

    fn wo_forward(
        &self,
        out: &mut [f32],
        att: &[f32],
        wo: Matrix,
        residual: &[f32],
        rows: usize,
    ) -> Result<()> {
        let Some(set) = self.program_set(rows, KernelKind::WoFwd) else {
            return super::kernels::wo_forward(self, out, att, wo, residual, rows);
        };
        let (dim, qd) = (wo.rows, wo.cols);
        self.projection(
            set,
            KernelKind::WoFwd,
            rows,
            &[("attn", att, qd)],
            &[(
                "wot",
                Fill::MatrixT {
                    w: wo.f32,
                    n: dim,
                    c: qd,
                },
            )],
            out,
        )?;
        self.residual_add(out, residual)
    }

    fn ffn_forward(&self, a: FfnForward) -> Result<()> {
        let Some(set) = self
            .program_set(a.rows, KernelKind::FfnFused)
            .filter(|_| a.delta.is_none())
        else {
            return super::kernels::ffn_forward(self, a);
        };
        self.block(|| {
            let seq = set.shape.seq;
            let k = self.kernel(set, KernelKind::FfnFused)?;
            let (dim, f) = (a.w.down.rows, a.w.down.cols);
            let weights = [
                (
                    "w1t",
                    Fill::MatrixT {
                        w: a.w.gate.f32,
                        n: f,
                        c: dim,
                    },
                ),
                (
                    "w3t",
                    Fill::MatrixT {
                        w: a.w.up.f32,
                        n: f,
                        c: dim,
                    },
                ),
                (
                    "w2",
                    Fill::Matrix {
                        m: a.w.down.f32,
                        c: dim,
                        n: f,
                    },
                ),
            ];
            let layer = a.w.gate.f32.as_ptr() as usize;
            for b in 0..a.rows / seq {
                let r = b * seq..(b + 1) * seq;
                let out = self.run_staged(
                    set,
                    KernelKind::FfnFused,
                    layer,
                    &[(
                        "xn",
                        Fill::Rows {
                            x: &a.xn[r.start * dim..r.end * dim],
                            c: dim,
                        },
                    )],
                    &weights,
                )?;
                out.get_rows(
                    k.slab("ffn"),
                    0,
                    &mut a.out[r.start * dim..r.end * dim],
                    seq,
                    dim,
                );
                for (name, dst) in [
                    ("h1", &mut a.acts.h1),
                    ("h3", &mut a.acts.h3),
                    ("gate", &mut a.acts.g),
                ] {
                    out.get_rows(k.slab(name), 0, &mut dst[r.start * f..r.end * f], seq, f);
                }
            }
            Ok(())
        })?;
        self.residual_add(a.out, a.residual)
    }

    fn ffn_backward_down(
        &self,
        dg: &mut [f32],
        dy: &[f32],
        down: Matrix,
        rows: usize,
    ) -> Result<()> {
        let Some(set) = self.program_set(rows, KernelKind::FfnBwdW2t) else {
            return self.linear_backward_input(dg, dy, down.f32, down.linear(rows), false);
        };
        let (dim, f) = (down.rows, down.cols);
        self.projection(
            set,
            KernelKind::FfnBwdW2t,
            rows,
            &[("dffn", dy, dim)],
            &[(
                "w2",
                Fill::Matrix {
                    m: down.f32,
                    c: dim,
                    n: f,
                },
            )],
            dg,
        )
    }

    fn ffn_backward_gate_up(
        &self,
        dxn: &mut [f32],
        dh1: &[f32],
        dh3: &[f32],
        w: &FfnWeights,
        rows: usize,
    ) -> Result<()> {
        let Some(set) = self.program_set(rows, KernelKind::FfnBwdW13t) else {
            return super::kernels::ffn_backward_gate_up(self, dxn, dh1, dh3, w, rows);
        };
        let (f, dim) = (w.gate.rows, w.gate.cols);
        self.projection(
            set,
            KernelKind::FfnBwdW13t,
            rows,
            &[("dh1", dh1, f), ("dh3", dh3, f)],
            &[
                (
                    "w1",
                    Fill::Matrix {
                        m: w.gate.f32,
                        c: f,
                        n: dim,
                    },
                ),
                (
                    "w3",
                    Fill::Matrix {
                        m: w.up.f32,
                        c: f,
                        n: dim,
                    },
                ),
            ],
            dxn,
        )
    }

    fn wo_backward(&self, datt: &mut [f32], dy: &[f32], wo: Matrix, rows: usize) -> Result<()> {
        let Some(set) = self.program_set(rows, KernelKind::WotBwd) else {
            return self.linear_backward_input(datt, dy, wo.f32, wo.linear(rows), false);
        };
        let (dim, qd) = (wo.rows, wo.cols);
        self.projection(
            set,
            KernelKind::WotBwd,
            rows,
            &[("dy", dy, dim)],
            &[(
                "wo",
                Fill::Matrix {
                    m: wo.f32,
                    c: dim,
                    n: qd,
                },
            )],
            datt,
        )
    }

    fn sdpa_backward(
        &self,
        g: QkvGrads,
        datt: &[f32],
        acts: &AttentionActs,
        s: &AttentionShape,
    ) -> Result<()> {
        let set = match self.program_set(s.rows(), KernelKind::SdpaBwd1) {
            Some(set)
                if set.shape.seq == s.seq && set.kernels.contains_key(&KernelKind::SdpaBwd2) =>
            {
                set
            }
            _ => return self.attention_backward(g, datt, &acts.saved, acts.qkv(), s),
        };
        self.block(|| {
            let (qd, kvd, seq, nh, hd) = (s.q_dim(), s.kv_dim(), s.seq, s.n_heads, s.head_dim);
            let group = s.n_heads / s.n_kv_heads;
            let k1 = self.kernel(set, KernelKind::SdpaBwd1)?;
            let k2 = self.kernel(set, KernelKind::SdpaBwd2)?;
            // Keys and values repeated per query head (query head h reads kv head h / group),
            // written by the CPU; their gradients come back per query head and are summed
            // over each group here.
            let mut k_rep = vec![0.0f32; seq * qd];
            let mut v_rep = vec![0.0f32; seq * qd];
            let mut dq_heads = vec![0.0f32; seq * qd];
            let mut dkv_heads = vec![0.0f32; seq * qd];
            for b in 0..s.batch {
                let r = b * seq..(b + 1) * seq;
                repeat_heads(
                    &acts.k[r.start * kvd..r.end * kvd],
                    &mut k_rep,
                    seq,
                    nh,
                    hd,
                    group,
                );
                repeat_heads(
                    &acts.v[r.start * kvd..r.end * kvd],
                    &mut v_rep,
                    seq,
                    nh,
                    hd,
                    group,
                );
                let mut in1 = Surface::new(k1.input.0, k1.input.1);
                in1.put_rows(k1.slab("q"), 0, &acts.q[r.start * qd..r.end * qd], seq, qd);
                in1.put_rows(k1.slab("k"), 0, &k_rep, seq, qd);
                in1.put_rows(k1.slab("v"), 0, &v_rep, seq, qd);
                in1.put_rows(
                    k1.slab("dattn"),
                    0,
                    &datt[r.start * qd..r.end * qd],
                    seq,
                    qd,
                );
                let out1 = self.run_whole(set, KernelKind::SdpaBwd1, &in1)?;
                out1.get_rows(k1.slab("dv"), 0, &mut dkv_heads, seq, qd);
                sum_groups(
                    &dkv_heads,
                    &mut g.dv[r.start * kvd..r.end * kvd],
                    seq,
                    nh,
                    hd,
                    group,
                );
                // P and dP go to the second kernel as raw fp16, as on the hardware.
                let mut in2 = Surface::new(k2.input.0, k2.input.1);
                in2.copy_channels(k2.slab("probs"), &out1, k1.slab("probs"), 2 * nh * seq);
                in2.put_rows(k2.slab("q"), 0, &acts.q[r.start * qd..r.end * qd], seq, qd);
                in2.put_rows(k2.slab("k"), 0, &k_rep, seq, qd);
                let out2 = self.run_whole(set, KernelKind::SdpaBwd2, &in2)?;
                out2.get_rows(k2.slab("dq"), 0, &mut dq_heads, seq, qd);
                g.dq[r.start * qd..r.end * qd].copy_from_slice(&dq_heads);
                out2.get_rows(k2.slab("dk"), 0, &mut dkv_heads, seq, qd);
                sum_groups(
                    &dkv_heads,
                    &mut g.dk[r.start * kvd..r.end * kvd],
                    seq,
                    nh,
                    hd,
                    group,
                );
            }
            Ok(())
        })
    }

    fn q_backward(&self, dxn: &mut [f32], dq: &[f32], wq: Matrix, rows: usize) -> Result<()> {
        let Some(set) = self.program_set(rows, KernelKind::QBwd) else {
            return self.linear_backward_input(dxn, dq, wq.f32, wq.linear(rows), false);
        };
        let (qd, dim) = (wq.rows, wq.cols);
        self.projection(
            set,
            KernelKind::QBwd,
            rows,
            &[("dq", dq, qd)],
            &[(
                "wq",
                Fill::Matrix {
                    m: wq.f32,
                    c: qd,
                    n: dim,
                },
            )],
            dxn,
        )
    }

    fn kv_backward(
        &self,
        dxn: &mut [f32],
        dk: &[f32],
        dv: &[f32],
        w: &AttentionWeights,
        rows: usize,
    ) -> Result<()> {
        let Some(set) = self.program_set(rows, KernelKind::KvBwd) else {
            self.linear_backward_input(dxn, dk, w.wk.f32, w.wk.linear(rows), true)?;
            return self.linear_backward_input(dxn, dv, w.wv.f32, w.wv.linear(rows), true);
        };
        let (kvd, dim) = (w.wk.rows, w.wk.cols);
        let mut add = vec![0.0; dxn.len()];
        self.projection(
            set,
            KernelKind::KvBwd,
            rows,
            &[("dk", dk, kvd), ("dv", dv, kvd)],
            &[
                (
                    "wk",
                    Fill::Matrix {
                        m: w.wk.f32,
                        c: kvd,
                        n: dim,
                    },
                ),
                (
                    "wv",
                    Fill::Matrix {
                        m: w.wv.f32,
                        c: kvd,
                        n: dim,
                    },
                ),
            ],
            &mut add,
        )?;
        self.residual_add(dxn, &add)
    }
}

/// Token-major keys or values `[S, KVH*HD]` repeated per query head into `[S, NH*HD]`: query
/// head `h` gets key/value head `h / group`.
fn repeat_heads(src: &[f32], dst: &mut [f32], seq: usize, nh: usize, hd: usize, group: usize) {
    let (kvd, qd) = (nh / group * hd, nh * hd);
    for t in 0..seq {
        for h in 0..nh {
            let j = h / group;
            dst[t * qd + h * hd..t * qd + (h + 1) * hd]
                .copy_from_slice(&src[t * kvd + j * hd..t * kvd + (j + 1) * hd]);
        }
    }
}

/// The gradients of repeated keys or values `[S, NH*HD]` summed back per key/value head
/// `[S, KVH*HD]` (overwritten).
fn sum_groups(src: &[f32], dst: &mut [f32], seq: usize, nh: usize, hd: usize, group: usize) {
    let (kvd, qd) = (nh / group * hd, nh * hd);
    dst.fill(0.0);
    for t in 0..seq {
        for h in 0..nh {
            let j = h / group;
            let d = &mut dst[t * kvd + j * hd..t * kvd + (j + 1) * hd];
            for (a, b) in d
                .iter_mut()
                .zip(&src[t * qd + h * hd..t * qd + (h + 1) * hd])
            {
                *a += b;
            }
        }
    }
}

impl AneKernels {
    /// Runs a projection kernel over the sequences of `rows`: activations `(slab, rows x c,
    /// c)` and weight slabs, into `out [rows, oc]` (overwritten).
    fn projection(
        &self,
        set: &KernelSet,
        kind: KernelKind,
        rows: usize,
        acts: &[(&str, &[f32], usize)],
        weights: &[(&str, Fill)],
        out: &mut [f32],
    ) -> Result<()> {
        self.block(|| {
            let seq = set.shape.seq;
            let k = self.kernel(set, kind)?;
            let oc = k.output.0;
            let layer = match weights.first() {
                Some((_, Fill::Matrix { m, .. })) => m.as_ptr() as usize,
                Some((_, Fill::MatrixT { w, .. })) => w.as_ptr() as usize,
                _ => 0,
            };
            for b in 0..rows / seq {
                let r = b * seq..(b + 1) * seq;
                let fills: Vec<(&str, Fill)> = acts
                    .iter()
                    .map(|&(name, a, c)| {
                        (
                            name,
                            Fill::Rows {
                                x: &a[r.start * c..r.end * c],
                                c,
                            },
                        )
                    })
                    .collect();
                let res = self.run_staged(set, kind, layer, &fills, weights)?;
                res.get_rows(0, 0, &mut out[r.start * oc..r.end * oc], seq, oc);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_repeat_in_the_hugging_face_order_and_their_gradients_sum_back() {
        // 2 kv heads of width 2, 4 query heads (group 2), 1 token.
        let kv = [1.0, 2.0, 3.0, 4.0];
        let mut rep = [0.0; 8];
        repeat_heads(&kv, &mut rep, 1, 4, 2, 2);
        assert_eq!(rep, [1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]);
        let mut back = [9.0; 4];
        sum_groups(&rep, &mut back, 1, 4, 2, 2);
        assert_eq!(back, [2.0, 4.0, 6.0, 8.0]);
    }

    #[test]
    fn relative_error_is_scaled_by_the_reference() {
        assert_eq!(relative_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((relative_error(&[1.0, 2.1], &[1.0, 2.0]) - 0.05).abs() < 1e-6);
        assert_eq!(relative_error(&[f32::NAN], &[1.0]), f64::INFINITY);
    }
}
