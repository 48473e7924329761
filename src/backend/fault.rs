//! A backend that fails on purpose, to test that backend errors reach the user with the run
//! folder intact. It is the default (fp32 CPU) composition of every kernel plus one injected
//! failure, chosen by the environment
//! variable `HANDGRAD_FAULT`: `prepare` (the default) fails in [`Kernels::prepare`];
//! `forward:N` fails in the N-th forward pass (counted by embedding lookups, 1-based);
//! `nan:N` makes the N-th forward pass produce NaN activations (so its loss and gradients are
//! not finite), `nan:N+` every pass from the N-th on.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::kernels::Kernels;
use super::types::StepShape;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Prepare,
    Forward(usize),
    /// NaN activations in forward pass `from` (and every later one when `onwards`).
    Nan {
        from: usize,
        onwards: bool,
    },
}

/// The default kernels with one injected failure.
pub(super) struct FaultKernels {
    fault: Fault,
    forwards: AtomicUsize,
}

impl FaultKernels {
    /// Reads the fault from `HANDGRAD_FAULT`.
    pub fn from_env() -> Result<Self> {
        let spec = std::env::var("HANDGRAD_FAULT").unwrap_or_else(|_| "prepare".into());
        let fault = match spec.split_once(':') {
            None if spec == "prepare" => Fault::Prepare,
            Some(("forward", n)) => match n.parse::<usize>() {
                Ok(n) if n >= 1 => Fault::Forward(n),
                _ => return Err(bad(&spec)),
            },
            Some(("nan", n)) => {
                let (n, onwards) = match n.strip_suffix('+') {
                    Some(n) => (n, true),
                    None => (n, false),
                };
                match n.parse::<usize>() {
                    Ok(from) if from >= 1 => Fault::Nan { from, onwards },
                    _ => return Err(bad(&spec)),
                }
            }
            _ => return Err(bad(&spec)),
        };
        Ok(FaultKernels {
            fault,
            forwards: AtomicUsize::new(0),
        })
    }
}

fn bad(spec: &str) -> Error {
    Error::invalid(format!(
        "HANDGRAD_FAULT='{spec}': expected 'prepare', 'forward:N', 'nan:N' or 'nan:N+' (N >= 1)"
    ))
}

impl Kernels for FaultKernels {
    fn prepare(&mut self, shape: &StepShape) -> Result<()> {
        if self.fault == Fault::Prepare {
            return Err(Error::backend(
                "fault-injection",
                "injected failure while preparing the kernels (HANDGRAD_FAULT=prepare)",
            ));
        }
        let _ = shape;
        Ok(())
    }

    fn embedding_forward(
        &self,
        out: &mut [f32],
        table: &[f32],
        ids: &[u32],
        dim: usize,
    ) -> Result<()> {
        let n = self.forwards.fetch_add(1, Ordering::SeqCst) + 1;
        if self.fault == Fault::Forward(n) {
            return Err(Error::backend(
                "fault-injection",
                format!("injected failure in forward pass {n} (HANDGRAD_FAULT=forward:{n})"),
            ));
        }
        crate::backend::cpu::embedding::embedding_forward(out, table, ids, dim);
        if let Fault::Nan { from, onwards } = self.fault
            && (n == from || (onwards && n > from))
        {
            out.fill(f32::NAN);
        }
        Ok(())
    }
}
