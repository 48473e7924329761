//! The memory a training run needs, checked against what the machine has before anything of
//! the run is written or allocated: a batch that cannot fit is refused in one line with both
//! figures and the largest batch that fits, instead of a process that grows until the
//! machine runs out.

use crate::backend::Kernels;
use crate::error::{Error, Result};
use crate::model::{BaseFormat, FrozenModel, LoraLayout, Transformer};
use crate::telemetry::human_bytes;

/// Bytes of everything a training process holds for one batch shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryNeed {
    /// f32 parameters, their gradients and the two AdamW moments (4 x 4 bytes each); with
    /// LoRA the frozen model (f32, bf16 or int8) and the adapters' 4 x 4 bytes.
    pub state: u64,
    /// Saved activations and backward scratch of one micro-batch.
    pub activations: u64,
    /// What the backend allocates for this shape (packing buffers, device surfaces).
    pub kernels: u64,
    /// The part of `activations + kernels` that grows with each sequence of the batch.
    pub per_sequence: u64,
    pub batch: usize,
}

impl MemoryNeed {
    /// The need of `batch` sequences of `seq` tokens of `model` on backend `k`, training the
    /// model or (`lora`) adapters of it.
    pub fn of(
        model: &Transformer,
        lora: Option<(&LoraLayout, BaseFormat)>,
        k: &dyn Kernels,
        batch: usize,
        seq: usize,
    ) -> Self {
        let params = model.layout.total() as u64;
        let acts = |b: usize| match lora {
            None => model.activation_bytes(k, b, seq) as u64,
            Some((l, _)) => model.activation_bytes_adapted(k, l, b, seq) as u64,
        };
        let batch_bytes = |b: usize| acts(b) + k.workspace_bytes(&model.step_shape(b, seq)) as u64;
        let one = batch_bytes(1);
        let per_sequence = batch_bytes(2).saturating_sub(one);
        let state = match lora {
            None => 16 * params,
            Some((l, f)) => {
                let matrices: usize = model
                    .layout
                    .tensors
                    .iter()
                    .filter(|t| t.shape.len() == 2)
                    .map(|t| t.len())
                    .sum();
                FrozenModel::bytes_for(f, params as usize, matrices) as u64 + 16 * l.total() as u64
            }
        };
        MemoryNeed {
            state,
            activations: acts(batch),
            kernels: k.workspace_bytes(&model.step_shape(batch, seq)) as u64,
            per_sequence,
            batch,
        }
    }

    pub fn total(&self) -> u64 {
        self.state + self.activations + self.kernels
    }

    /// The largest batch whose need fits in `available` bytes (0 when not even one does).
    pub fn largest_batch(&self, available: u64) -> usize {
        let fixed = self
            .total()
            .saturating_sub(self.per_sequence * self.batch as u64);
        if self.per_sequence == 0 {
            return if fixed <= available { usize::MAX } else { 0 };
        }
        (available.saturating_sub(fixed) / self.per_sequence).min(usize::MAX as u64) as usize
    }

    /// Refuses a need above `available` (when known), with both figures, what the need is
    /// made of and the largest batch that fits.
    pub fn check(&self, available: Option<u64>) -> Result<()> {
        let Some(avail) = available else {
            return Ok(());
        };
        if self.total() <= avail {
            return Ok(());
        }
        let fits = self.largest_batch(avail);
        let hint = if fits == 0 {
            "not even --batch 1 fits: use a shorter --seq or a smaller model".to_string()
        } else {
            format!(
                "the largest batch that fits is --batch {fits} (raise --accum to keep the sequences per update)"
            )
        };
        Err(Error::invalid(format!(
            "--batch {} needs {} of memory ({} parameters, gradients and AdamW moments, {} activations, {} kernel buffers) but {} is available; {hint}",
            self.batch,
            human_bytes(self.total() as f64),
            human_bytes(self.state as f64),
            human_bytes(self.activations as f64),
            human_bytes(self.kernels as f64),
            human_bytes(avail as f64),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(batch: usize) -> MemoryNeed {
        MemoryNeed {
            state: 1000,
            activations: 100 * batch as u64 + 50,
            kernels: 10,
            per_sequence: 100,
            batch,
        }
    }

    #[test]
    fn the_largest_batch_fits_and_one_more_does_not() {
        let n = need(64);
        let fits = n.largest_batch(5000);
        assert_eq!(fits, 39);
        assert!(need(fits).total() <= 5000);
        assert!(need(fits + 1).total() > 5000);
        assert_eq!(n.largest_batch(1000), 0);
    }

    #[test]
    fn a_need_above_the_memory_is_refused_with_both_figures() {
        let e = need(64).check(Some(5000)).unwrap_err().to_string();
        assert!(e.contains("--batch 64 needs"), "{e}");
        assert!(e.contains("available"), "{e}");
        assert!(e.contains("--batch 39"), "{e}");
        assert!(need(64).check(Some(100_000)).is_ok());
        assert!(need(64).check(None).is_ok());
    }
}
