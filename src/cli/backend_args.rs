//! `--backend` and `--precision`, shared by `train`, `generate` and `bench`.

use clap::Args;

use crate::backend::{Backend, BackendKind, Precision};

/// The compute backend options of a command.
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct BackendArgs {
    /// Compute backend [default: cpu].
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// Matmul precision [default: fp32 on the CPU, fp16 on the Neural Engine backends]: fp32,
    /// or bf16 (bf16 products with f32 accumulation, on AMX or AVX512_BF16 where the CPU has
    /// them, emulated elsewhere; master weights, optimizer, norms, softmax, loss and the
    /// residual stream stay f32), or fp16 (ane, ane-sim only).
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
}

impl BackendArgs {
    /// The backend asked for, with defaults for what was not given.
    pub fn resolve(&self) -> Backend {
        self.resolve_with(self.backend.unwrap_or_default().default_precision())
    }

    /// As [`BackendArgs::resolve`] with another default precision.
    pub fn resolve_with(&self, default_precision: Precision) -> Backend {
        Backend::new(
            self.backend.unwrap_or_default(),
            self.precision.unwrap_or(default_precision),
        )
    }
}
