//! What an update cost the machine, for its `step` event: CPU use, energy (where the machine
//! reports it) and, now and then, the resident memory.

use crate::telemetry::power::PowerMeter;

/// Step events carry the process's resident memory every this many updates (and the first).
const RSS_EVERY: u64 = 10;

/// The readings of one update.
pub(super) struct Readings {
    /// CPU time over wall time, in percent (`None` for updates too short to tell).
    pub cpu_percent: Option<f64>,
    pub energy_j: Option<f64>,
}

/// Resource readings around each update.
pub(super) struct Meter {
    power: Option<PowerMeter>,
    cpu0: Option<f64>,
}

impl Meter {
    pub fn open() -> Self {
        Meter {
            power: PowerMeter::open(),
            cpu0: None,
        }
    }

    /// Where power readings come from (`None`: the machine reports none).
    pub fn power_source(&self) -> Option<String> {
        self.power.as_ref().map(|p| p.source().to_string())
    }

    /// Marks the start of an update.
    pub fn begin(&mut self) {
        self.cpu0 = crate::util::mem::cpu_seconds();
        if let Some(p) = &mut self.power {
            p.joules_since_last();
        }
    }

    /// The readings since [`Meter::begin`], for an update of `wall` seconds.
    pub fn end(&mut self, wall: f64) -> Readings {
        let cpu_percent = match (self.cpu0, crate::util::mem::cpu_seconds()) {
            // /proc counts in 10 ms ticks: shorter updates give no meaningful figure.
            (Some(a), Some(b)) if wall >= 0.1 => Some(100.0 * (b - a) / wall),
            _ => None,
        };
        let energy_j = self.power.as_mut().and_then(|p| p.joules_since_last());
        Readings {
            cpu_percent,
            energy_j,
        }
    }
}

/// The resident memory, on the first update of a session and every [`RSS_EVERY`] updates.
pub(super) fn rss_due(step: u64, first_step: u64) -> Option<u64> {
    (step == first_step + 1 || step.is_multiple_of(RSS_EVERY))
        .then(crate::util::mem::rss_bytes)
        .flatten()
}
