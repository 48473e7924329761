#!/usr/bin/env bash
# Runs every cargo-fuzz target (or those named in TARGETS="a b") for SECONDS (default 300),
# JOBS at a time (default 2), growing
# the committed corpora in fuzz/corpus/, and prints executions, coverage and crashes per
# target. Crashing inputs land in fuzz/artifacts/TARGET/. Needs cargo-fuzz and nightly.
set -euo pipefail
cd "$(dirname "$0")/../../fuzz"
SECONDS_PER_TARGET="${1:-300}"
JOBS="${2:-2}"
cargo +nightly fuzz build -O >/dev/null
BIN=target/x86_64-unknown-linux-gnu/release
LOGS=target/fuzz-logs
mkdir -p "$LOGS"
export TMPDIR=/dev/shm
run_one() {
  local t=$1
  mkdir -p "artifacts/$t"
  "$BIN/$t" "corpus/$t" -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 \
    -timeout=10 -max_len=65536 -artifact_prefix="artifacts/$t/" -print_final_stats=1 \
    >"$LOGS/$t.log" 2>&1 || true
}
targets=${TARGETS:-$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v handgrad-fuzz)}
for t in $targets; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done
  run_one "$t" &
done
wait
printf '| target | executions | coverage (edges) | corpus | crashes |\n|---|---|---|---|---|\n'
for t in $targets; do
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$LOGS/$t.log" | grep -o '[0-9]*$' || echo "?")
  cov=$(grep -o 'cov: [0-9]*' "$LOGS/$t.log" | tail -1 | grep -o '[0-9]*' || echo "?")
  corpus=$(ls "corpus/$t" | wc -l)
  crashes=$(ls "artifacts/$t" 2>/dev/null | wc -l)
  printf '| %s | %s | %s | %s | %s |\n' "$t" "$execs" "$cov" "$corpus" "$crashes"
done
