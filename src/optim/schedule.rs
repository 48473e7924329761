//! Learning-rate schedule: linear warmup, then cosine decay to a floor, indexed by optimizer
//! update (not by micro-step).

use serde::{Deserialize, Serialize};

/// Warmup + cosine schedule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CosineSchedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// Updates of linear warmup.
    pub warmup: usize,
    /// Total updates of the run.
    pub total: usize,
}

impl CosineSchedule {
    /// Learning rate of update `step` (0-based): `lr * (step + 1) / warmup` during warmup, then
    /// `min + (lr - min) * (1 + cos(pi * progress)) / 2` with progress going from 0 to 1 over the
    /// remaining updates; `min` after the end.
    pub fn lr_at(&self, step: usize) -> f64 {
        let min = self.lr * self.min_lr_ratio;
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let decay = self.total.saturating_sub(self.warmup);
        if decay <= 1 || step >= self.total {
            return if step >= self.total { min } else { self.lr };
        }
        let progress = ((step - self.warmup) as f64 / (decay - 1) as f64).min(1.0);
        min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_the_floor() {
        let s = CosineSchedule {
            lr: 1e-3,
            min_lr_ratio: 0.1,
            warmup: 10,
            total: 110,
        };
        assert!((s.lr_at(0) - 1e-4).abs() < 1e-12);
        assert!((s.lr_at(9) - 1e-3).abs() < 1e-12);
        assert!((s.lr_at(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr_at(109) - 1e-4).abs() < 1e-12);
        assert!((s.lr_at(60) - 0.55e-3).abs() < 1e-5);
        for i in 10..109 {
            assert!(s.lr_at(i + 1) <= s.lr_at(i));
        }
        assert!((s.lr_at(500) - 1e-4).abs() < 1e-12);
    }
}
