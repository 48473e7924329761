//! The Neural Engine compiler's per-process budget (DESIGN.md §3: the compiler leaks, so a
//! process compiles about 119 programs before it fails). When the kernels of a run do not fit
//! in what this process has left, the run is restarted in a fresh process: decided here, once;
//! the command line only replaces the process ([`Error::RestartProcess`]).

use crate::error::Error;
use crate::run::RunDir;
use crate::telemetry::{Event, EventBus, JsonlSink};

/// Restarts in a row so far (set in the environment of the restarted process).
pub const RESTARTS_VAR: &str = "HANDGRAD_ANE_RESTARTS";
/// Restarts in a row after which the run stops with an error instead.
const MAX_RESTARTS: u32 = 3;

/// The error a run's start ends with when its kernels could not be prepared (`e`): a spent
/// compile budget becomes [`Error::RestartProcess`] (said as a `restart` event in the run's
/// log, when it has one) where a restart can help and the caller can restart (`allowed`);
/// otherwise the budget error says why no restart helps. Any other error is returned as is.
pub fn restart_or_fail(
    e: Error,
    allowed: bool,
    paths: &RunDir,
    bus: &mut EventBus,
    step: u64,
) -> Error {
    let Error::AneCompileBudget {
        used,
        needed,
        limit,
    } = e
    else {
        return e;
    };
    if !allowed {
        return e;
    }
    if needed > limit {
        return Error::invalid(format!(
            "{e}; one kernel set needs {needed} compiles, more than the budget of {limit} (raise HANDGRAD_ANE_COMPILE_BUDGET)"
        ));
    }
    let restarts = restarts_so_far();
    if restarts >= MAX_RESTARTS {
        return Error::invalid(format!("{e}; still so after {restarts} restarts in a row"));
    }
    if paths.events().exists()
        && let Ok(log) = JsonlSink::open(&paths.events())
    {
        bus.attach_log(Box::new(log));
    }
    bus.emit(Event::Restart {
        step,
        reason: e.to_string(),
        compiles_used: used,
        compile_budget: limit,
    });
    bus.finish();
    Error::RestartProcess {
        restarts: restarts + 1,
        reason: e.to_string(),
    }
}

fn restarts_so_far() -> u32 {
    std::env::var(RESTARTS_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
