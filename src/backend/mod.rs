//! Compute backends behind one [`Kernels`] interface, chosen by one [`Backend`] value.
//!
//! The model's forward and backward (`model::transformer`) call only methods of [`Kernels`]:
//! fine-grained operations and the coarse blocks of the original accelerator design
//! (`kernels.rs`). Every method has a default (the CPU kernels of [`cpu`], composed by
//! [`blocks`] for the blocks), so a backend overrides exactly what it accelerates.
//! [`conformance`] checks any backend against reference kernels.

pub mod ane;
pub mod blocks;
pub mod conformance;
pub mod cpu;
pub mod cpu_kernels;
mod fault;
pub mod kernels;
pub mod types;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use blocks::{
    Attend, AttentionActs, AttentionWeights, FfnActs, FfnWeights, GateUpDelta, KvCache, QkvDelta,
};
pub use cpu_kernels::{CpuBf16Kernels, CpuKernels};
pub use kernels::{AcceleratorStats, KernelPlacement, Kernels, LinearOut, Tolerance};
pub use types::{
    AttentionShape, CachedAttentionShape, CompactWeights, IGNORE_TARGET, LinearShape, Matrix,
    ModelDims, NormSaved, Positions, Qkv, QkvGrads, RopeStyle, RopeTable, StepShape, WeightFormat,
};

use crate::error::Result;

/// Which machine computes the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// The CPU (every operation; multi-threaded).
    #[default]
    Cpu,
    /// The ten Apple Neural Engine kernels as MIL programs run by handgrad's simulator (fp16),
    /// the rest on the CPU: verifies the ANE path on any machine; slow.
    AneSim,
    /// The ten kernels on the Apple Neural Engine (macOS on Apple silicon), through Apple's
    /// private API; the rest on the CPU, as with ane-sim.
    Ane,
    /// The ANE runtime's whole call sequence against a fake device that runs the programs in
    /// the simulator (`HANDGRAD_ANE_FAKE_FAULTS` injects failures). For tests.
    #[value(hide = true)]
    AneFake,
    /// The fp32 CPU kernels with an injected failure, to test error paths (`HANDGRAD_FAULT=prepare` or
    /// `HANDGRAD_FAULT=forward:N`, the N-th forward pass). Not for users.
    #[value(hide = true)]
    FaultInjection,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Cpu => "cpu",
            BackendKind::AneSim => "ane-sim",
            BackendKind::Ane => "ane",
            BackendKind::AneFake => "ane-fake",
            BackendKind::FaultInjection => "fault-injection",
        })
    }
}

/// The precision of the matrix multiplies. Master weights, optimizer state, norms, softmax,
/// the loss and the residual stream are f32 in every precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 products.
    #[default]
    Fp32,
    /// bf16 operands, f32 accumulation.
    Bf16,
    /// fp16 throughout the kernels: the Neural Engine's (ane, ane-sim), not the CPU's.
    Fp16,
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        })
    }
}

/// Choices about the kernels that do not change their numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelOptions {
    /// On the Neural Engine: a kernel the device rejects (or computes wrongly) is an error
    /// instead of running on the CPU (`--ane-strict`).
    pub ane_strict: bool,
}

/// A backend and precision, as chosen with `--backend` and `--precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Backend {
    pub kind: BackendKind,
    pub precision: Precision,
}

/// What a run or a benchmark ran on, as recorded in `run_start` and in benchmark results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendInfo {
    pub backend: BackendKind,
    pub precision: Precision,
    /// The kernels in use, in words.
    pub details: String,
    /// Where the original's ten kernels run, on an accelerator backend (a kernel the device
    /// rejected runs on the CPU, with the reason).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernels: Vec<KernelPlacement>,
}

impl BackendKind {
    /// The precision this backend computes in when none is asked for: fp16 on the Neural
    /// Engine backends, fp32 on the CPU.
    pub fn default_precision(self) -> Precision {
        match self {
            BackendKind::AneSim | BackendKind::Ane | BackendKind::AneFake => Precision::Fp16,
            BackendKind::Cpu | BackendKind::FaultInjection => Precision::Fp32,
        }
    }
}

impl Backend {
    /// A backend in a precision, as it is reported: the Neural Engine backends compute in
    /// fp16 whatever a configuration saved before they said so holds (`fp32`).
    pub fn new(kind: BackendKind, precision: Precision) -> Self {
        let precision = match (kind.default_precision(), precision) {
            (Precision::Fp16, Precision::Fp32) => Precision::Fp16,
            _ => precision,
        };
        Backend { kind, precision }
    }

    /// The CPU in a precision.
    pub fn cpu(precision: Precision) -> Self {
        Backend {
            kind: BackendKind::Cpu,
            precision,
        }
    }

    /// A fresh set of kernels (call [`Kernels::prepare`] before the first step).
    pub fn kernels(&self) -> Result<Box<dyn Kernels>> {
        self.kernels_with(KernelOptions::default())
    }

    /// [`Backend::kernels`] with options that do not change the numbers.
    pub fn kernels_with(&self, options: KernelOptions) -> Result<Box<dyn Kernels>> {
        let ane = ane::AneOptions {
            strict: options.ane_strict,
            // For comparing the bytes moved with and without staging (`bench train`).
            restage_every_call: std::env::var("HANDGRAD_ANE_STAGING")
                .is_ok_and(|v| v == "per-call"),
        };
        Ok(match (self.kind, self.precision) {
            (BackendKind::Cpu, Precision::Fp32) => Box::new(cpu_kernels::CpuKernels),
            (BackendKind::Cpu, Precision::Bf16) => Box::new(cpu_kernels::CpuBf16Kernels),
            (BackendKind::Cpu | BackendKind::FaultInjection, Precision::Fp16) => {
                return Err(crate::Error::invalid(
                    "--precision fp16 is the Neural Engine's (--backend ane or ane-sim); the CPU computes in fp32 or bf16",
                ));
            }
            (BackendKind::AneSim | BackendKind::Ane | BackendKind::AneFake, Precision::Bf16) => {
                return Err(crate::Error::invalid(format!(
                    "--backend {} computes in fp16 on the Neural Engine's terms; --precision bf16 is a CPU option (drop it)",
                    self.kind
                )));
            }
            (BackendKind::AneSim, Precision::Fp32 | Precision::Fp16) => Box::new(
                ane::AneKernels::simulator(ane::runtime::program_form("")).with_options(ane),
            ),
            (BackendKind::Ane, Precision::Fp32 | Precision::Fp16) => {
                let platform = ane::runtime::apple::ApplePlatform::open()?;
                let chip = ane::runtime::chip_name().unwrap_or_default();
                Box::new(
                    ane::AneKernels::device(
                        Box::new(platform),
                        ane::runtime::program_form(&chip),
                        "ane",
                    )
                    .with_options(ane),
                )
            }
            (BackendKind::AneFake, Precision::Fp32 | Precision::Fp16) => Box::new(
                ane::AneKernels::device(
                    Box::new(ane::runtime::fake::FakePlatform::from_env()),
                    ane::runtime::program_form(""),
                    "ane-fake",
                )
                .with_options(ane),
            ),
            (BackendKind::FaultInjection, _) => Box::new(fault::FaultKernels::from_env()?),
        })
    }

    /// What this backend is, for reports.
    pub fn info(&self) -> BackendInfo {
        BackendInfo {
            backend: self.kind,
            precision: self.precision,
            details: match self.kind {
                BackendKind::AneSim => format!("the ten ANE kernels as MIL ({} form) in handgrad's fp16 simulator; embedding, norms, residuals, weight gradients, classifier and AdamW on the CPU in f32", ane::runtime::program_form("").opset()),
                BackendKind::Ane => format!("the ten ANE kernels as MIL ({} form) on the Neural Engine of {}; embedding, norms, residuals, weight gradients, classifier and AdamW on the CPU in f32", ane::runtime::program_form(&ane::runtime::chip_name().unwrap_or_default()).opset(), ane::runtime::chip_name().unwrap_or_else(|| "this Mac".into())),
                BackendKind::AneFake => "the ten ANE kernels through the ANE runtime's call sequence against a fake device (the simulator); the rest on the CPU in f32".to_string(),
                _ => cpu::describe(self.precision == Precision::Bf16),
            },
            kernels: Vec::new(),
        }
    }

    /// Things a user should know about this choice on this machine.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.kind == BackendKind::Cpu
            && self.precision == Precision::Bf16
            && !cpu::bf16_in_hardware()
        {
            w.push(if cpu::Bf16Path::available_paths().len() > 1 {
                "HANDGRAD_BF16=portable: bf16 matmuls are emulated (same numerics, slower than fp32)"
                    .to_string()
            } else {
                "this CPU has no AVX512_BF16: bf16 matmuls are emulated (same numerics, slower than fp32)"
                    .to_string()
            });
        }
        w
    }
}

impl WeightFormat {
    /// Refuses a format the kernels cannot read (q8 runs only on the CPU's int8 products).
    pub fn check_kernels(self, kernels: &dyn Kernels, backend: BackendKind) -> Result<()> {
        if !kernels.reads_weights(self) {
            return Err(crate::Error::invalid(format!(
                "--weights {self} runs on the CPU kernels; --backend {backend} computes in its own precision"
            )));
        }
        Ok(())
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.precision)
    }
}
