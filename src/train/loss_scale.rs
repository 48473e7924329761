//! Loss scaling: the loss (and so every gradient of the backward pass) is multiplied by a
//! scale before the backward pass and divided by it again before clipping and the update, so
//! that small gradients survive fp16 kernels. Static scaling uses one value (the original
//! system's 256); dynamic scaling skips an update whose gradient overflowed, halves the scale,
//! and doubles it again after a run of clean updates.

use serde::{Deserialize, Serialize};

use crate::backend::BackendKind;
use crate::error::{Error, Result};

/// The loss-scaling policy of a run (`--loss-scale`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LossScale {
    /// Dynamic on fp16 backends (`ane-sim`), none on the CPU.
    #[default]
    Auto,
    /// No scaling (the f32 and bf16 CPU paths need none).
    None,
    /// One fixed scale; a non-finite gradient stops the run.
    Static { scale: f64 },
    /// Starts at `scale`; an overflow skips the update and halves it; `growth_interval`
    /// clean updates in a row double it.
    Dynamic { scale: f64, growth_interval: u64 },
}

/// Dynamic scaling's defaults: the original's static scale to start from, and PyTorch's
/// growth and back-off factors (2 and 1/2) with a shorter growth interval.
pub const DEFAULT_SCALE: f64 = 256.0;
pub const DEFAULT_GROWTH_INTERVAL: u64 = 200;
/// Below this the scale cannot help any more: the run has diverged.
const MIN_SCALE: f64 = 1.0 / (1u64 << 24) as f64;

impl std::str::FromStr for LossScale {
    type Err = String;

    /// `auto`, `none`, `static`, `static:S`, `dynamic`, `dynamic:S`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (kind, value) = match s.split_once(':') {
            Some((k, v)) => (k, Some(v)),
            None => (s, None),
        };
        let scale = match value {
            None => DEFAULT_SCALE,
            Some(v) => match v.parse::<f64>() {
                Ok(x) if x > 0.0 && x.is_finite() => x,
                _ => return Err(format!("loss scale '{v}' must be a positive number")),
            },
        };
        match (kind, value) {
            ("auto", None) => Ok(LossScale::Auto),
            ("none", None) => Ok(LossScale::None),
            ("static", _) => Ok(LossScale::Static { scale }),
            ("dynamic", _) => Ok(LossScale::Dynamic {
                scale,
                growth_interval: DEFAULT_GROWTH_INTERVAL,
            }),
            _ => Err(format!(
                "'{s}': expected auto, none, static[:SCALE] or dynamic[:SCALE]"
            )),
        }
    }
}

impl LossScale {
    /// The policy for a backend (`Auto` resolved).
    pub fn resolve(self, backend: BackendKind) -> LossScale {
        match (self, backend) {
            (LossScale::Auto, BackendKind::AneSim | BackendKind::Ane | BackendKind::AneFake) => {
                LossScale::Dynamic {
                    scale: DEFAULT_SCALE,
                    growth_interval: DEFAULT_GROWTH_INTERVAL,
                }
            }
            (LossScale::Auto, _) => LossScale::None,
            (p, _) => p,
        }
    }
}

/// What the scaler carries between updates (saved in checkpoints for exact resume).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScalerState {
    pub scale: f64,
    /// Clean updates since the scale last changed.
    pub good_steps: u64,
}

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
