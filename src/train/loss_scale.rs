//! Loss scaling: the loss (and so every gradient of the backward pass) is multiplied by a
//! scale before the backward pass and divided by it again before clipping and the update, so
//! that small gradients survive fp16 kernels. Static scaling uses one value (the original
//! system's 256); dynamic scaling skips an update whose gradient overflowed, halves the scale,
//! and doubles it again after a run of clean updates.

use crate::error::{Error, Result};
pub use crate::formats::checkpoint::ScalerState;
pub use crate::run::config::{DEFAULT_GROWTH_INTERVAL, DEFAULT_SCALE, LossScale};

/// Below this the scale cannot help any more: the run has diverged.
const MIN_SCALE: f64 = 1.0 / (1u64 << 24) as f64;

/// The loss scaler of a run.
#[derive(Debug, Clone)]
pub struct LossScaler {
    policy: LossScale,
    state: ScalerState,
    /// Without dynamic scaling: non-finite updates in a row that stop the run.
    max_bad: u64,
    /// Non-finite updates in a row so far.
    bad_streak: u64,
}

/// What the scaler decided about one update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// The update was applied.
    Applied,
    /// The gradient overflowed: the update was skipped and the scale lowered.
    Skipped,
}

impl LossScaler {
    /// A scaler for a resolved policy, continuing from a saved state when there is one.
    pub fn new(policy: LossScale, saved: Option<ScalerState>, max_bad: usize) -> Self {
        let scale = match policy {
            LossScale::Static { scale } | LossScale::Dynamic { scale, .. } => scale,
            LossScale::None | LossScale::Auto => 1.0,
        };
        // A saved state counts only for a policy that scales, and only if it is a scale.
        let saved = saved.filter(|st| {
            matches!(policy, LossScale::Static { .. } | LossScale::Dynamic { .. })
                && st.scale.is_finite()
                && st.scale > 0.0
        });
        let saved = match policy {
            // A static scale is the user's number, not the checkpoint's.
            LossScale::Static { .. } => None,
            _ => saved,
        };
        LossScaler {
            policy,
            state: saved.unwrap_or(ScalerState {
                scale,
                good_steps: 0,
            }),
            max_bad: max_bad.max(1) as u64,
            bad_streak: 0,
        }
    }

    /// The scale of the next update.
    pub fn scale(&self) -> f64 {
        self.state.scale
    }

    /// The scale to report (none when the run does not scale).
    pub fn reported(&self) -> Option<f64> {
        match self.policy {
            LossScale::None | LossScale::Auto => None,
            _ => Some(self.state.scale),
        }
    }

    /// Whether the scale adapts (overflows then skip an update and lower it).
    pub fn is_dynamic(&self) -> bool {
        matches!(self.policy, LossScale::Dynamic { .. })
    }

    /// The state to save.
    pub fn state(&self) -> Option<ScalerState> {
        self.reported().map(|_| self.state)
    }

    /// Takes the outcome of an update (`finite`: its loss and gradient were finite). With
    /// dynamic scaling a non-finite update lowers the scale; otherwise it is skipped, and the
    /// `max_bad`-th in a row is an error.
    pub fn update(&mut self, finite: bool, step: u64, detail: &str) -> Result<Verdict> {
        let s = &mut self.state;
        if let LossScale::Dynamic {
            growth_interval, ..
        } = self.policy
        {
            if finite {
                s.good_steps += 1;
                if s.good_steps >= growth_interval {
                    s.scale *= 2.0;
                    s.good_steps = 0;
                }
                return Ok(Verdict::Applied);
            }
            s.scale *= 0.5;
            s.good_steps = 0;
            if s.scale < MIN_SCALE {
                return Err(Error::invalid(format!(
                    "training diverged at update {step}: {detail}, and the loss scale fell below 2^-24 (try a lower --lr); the last checkpoint is intact"
                )));
            }
            return Ok(Verdict::Skipped);
        }
        if finite {
            self.bad_streak = 0;
            return Ok(Verdict::Applied);
        }
        self.bad_streak += 1;
        if self.bad_streak < self.max_bad {
            return Ok(Verdict::Skipped);
        }
        let what = if self.max_bad > 1 {
            format!(
                "{} non-finite updates in a row, the last with {detail}",
                self.bad_streak
            )
        } else {
            detail.to_string()
        };
        Err(Error::invalid(match self.policy {
            LossScale::Static { .. } => format!(
                "training diverged at update {step}: {what}, with a static loss scale of {} (try --loss-scale dynamic or a lower --lr); the last checkpoint is intact",
                s.scale
            ),
            _ => format!(
                "training diverged at update {step}: {what} (try a lower --lr); the last checkpoint is intact"
            ),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_scaling_backs_off_and_grows() {
        let policy = LossScale::Dynamic {
            scale: 1024.0,
            growth_interval: 3,
        };
        let mut s = LossScaler::new(policy, None, 1);
        assert_eq!(s.update(false, 1, "x").unwrap(), Verdict::Skipped);
        assert_eq!(s.scale(), 512.0);
        for i in 0..3 {
            assert_eq!(s.update(true, 2 + i, "x").unwrap(), Verdict::Applied);
        }
        assert_eq!(s.scale(), 1024.0);
        let mut st = LossScaler::new(LossScale::Static { scale: 256.0 }, None, 1);
        assert!(
            st.update(false, 5, "loss inf")
                .unwrap_err()
                .to_string()
                .contains("dynamic")
        );
        let mut none = LossScaler::new(LossScale::None, None, 1);
        assert_eq!(none.reported(), None);
        assert!(none.update(false, 5, "loss inf").is_err());
        // K = 3: two bad updates are skipped, a good one resets the count, the third in a row
        // stops the run.
        let mut k = LossScaler::new(LossScale::None, None, 3);
        assert_eq!(k.update(false, 1, "x").unwrap(), Verdict::Skipped);
        assert_eq!(k.update(false, 2, "x").unwrap(), Verdict::Skipped);
        assert_eq!(k.update(true, 3, "x").unwrap(), Verdict::Applied);
        assert_eq!(k.update(false, 4, "x").unwrap(), Verdict::Skipped);
        assert_eq!(k.update(false, 5, "x").unwrap(), Verdict::Skipped);
        let e = k.update(false, 6, "loss NaN").unwrap_err().to_string();
        assert!(e.contains("3 non-finite updates in a row"), "{e}");
    }

    #[test]
    fn a_saved_scale_counts_only_where_the_policy_scales() {
        let saved = Some(ScalerState {
            scale: 64.0,
            good_steps: 3,
        });
        assert_eq!(LossScaler::new(LossScale::None, saved, 1).scale(), 1.0);
        let dynamic = LossScale::Dynamic {
            scale: 256.0,
            growth_interval: 200,
        };
        assert_eq!(LossScaler::new(dynamic, saved, 1).scale(), 64.0);
        let bad = Some(ScalerState {
            scale: f64::NAN,
            good_steps: 0,
        });
        assert_eq!(LossScaler::new(dynamic, bad, 1).scale(), 256.0);
        assert_eq!(
            LossScaler::new(LossScale::Static { scale: 128.0 }, saved, 1).scale(),
            128.0
        );
    }

    #[test]
    fn parses_the_flag() {
        assert_eq!("none".parse::<LossScale>(), Ok(LossScale::None));
        assert_eq!(
            "static:128".parse::<LossScale>(),
            Ok(LossScale::Static { scale: 128.0 })
        );
        assert!(matches!(
            "dynamic".parse::<LossScale>(),
            Ok(LossScale::Dynamic { scale: 256.0, .. })
        ));
        assert!("dynamic:-1".parse::<LossScale>().is_err());
        assert!("sometimes".parse::<LossScale>().is_err());
    }
}
