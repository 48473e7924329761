#!/usr/bin/env bash
# Kills a real `handgrad train` with SIGKILL N times at random moments (half of the runs
# with slowed checkpoint writes, so kills land inside writes too), resumes after each, and
# checks that the final weights equal an uninterrupted run's. Prints kills, resumes,
# updates lost per kill and corrupt loads. CI runs the same test with 8 kills.
set -euo pipefail
cd "$(dirname "$0")/../.."
HANDGRAD_KILLS="${1:-50}" cargo test --release --test reliability sigkill -- --nocapture 2>&1 |
  grep -E '^kills|test result|panicked'
