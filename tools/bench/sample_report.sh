#!/usr/bin/env bash
# Makes the sample benchmark report of the README: every bench command's --json result on this
# machine, merged by `handgrad bench report` into docs/bench/REPORT.md with its charts.
#   cargo build --release && tools/bench/sample_report.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-docs/bench}"
hg=target/release/handgrad
mkdir -p "$out"
host="$(hostname -s 2>/dev/null || echo host)"
r="$out/results"
mkdir -p "$r"
$hg bench train --model stories110m --batch 4 --seq 256 --json > "$r/$host-train-fp32.json"
$hg bench train --model stories110m --batch 4 --seq 256 --precision bf16 --json > "$r/$host-train-bf16.json"
for w in fp32 bf16 q8; do
  $hg bench generate --model stories110m --weights "$w" --json > "$r/$host-generate-$w.json"
done
$hg bench matmul --model stories110m --json > "$r/$host-matmul-fp32.json"
$hg bench matmul --model stories110m --precision bf16 --json > "$r/$host-matmul-bf16.json"
$hg bench matmul --model stories110m --int8 --json > "$r/$host-matmul-int8.json"
$hg bench memory --max 256M --json > "$r/$host-memory.json"
$hg bench latency --json > "$r/$host-latency.json"
$hg bench report "$r"/*.json -o "$out/REPORT.md"
