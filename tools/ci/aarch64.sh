#!/usr/bin/env bash
# The Mac build, checked from an x86-64 Linux machine (called by .ci/run):
#   1. clippy of every target for aarch64-apple-darwin (type-checks the Accelerate and ANE
#      code as a Mac compiles it; the final link needs Apple's SDK, which Linux lacks);
#   2. clippy of every target for aarch64-unknown-linux-gnu;
#   3. tests built for aarch64-unknown-linux-gnu and run under qemu-user: the NEON and
#      portable kernels a Mac's CPU takes.
# Installs what it needs (idempotent, quiet): rustup targets, Debian's aarch64 cross gcc and
# qemu-user, and PyPI's ziglang (the C compiler for the Apple target's C dependencies:
# mimalloc, onig, ring). Extra arguments go to the test binaries (e.g. a name filter).
#
# Measured on 2 cores (another build running beside it): with the dependencies built and
# handgrad changed, 5.5 minutes (each clippy 10 s, the test build 1.5 minutes, the tests
# 3.5-4 minutes under qemu); from an empty target folder, 11 minutes (the clippies 1.3 and
# 1.1 minutes, the test build 4 minutes).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

# Cross builds in their own folder (CARGO_TARGET_DIR if set, else target/cross): their
# build scripts and proc macros are built for the host without the host build's flags, and
# sharing target/ would make the two builds replace each other's.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/cross}"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
quiet() { # runs a command quietly, printing its output only if it fails
  if ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    return 1
  fi
}

# --- tools -----------------------------------------------------------------------------
need_apt=()
command -v aarch64-linux-gnu-gcc >/dev/null || need_apt+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || need_apt+=(qemu-user)
if [ ${#need_apt[@]} -gt 0 ]; then
  quiet apt-get install -y -q "${need_apt[@]}" ||
    { quiet apt-get update -q && quiet apt-get install -y -q "${need_apt[@]}"; }
fi
installed=$(rustup target list --installed)
for t in aarch64-apple-darwin aarch64-unknown-linux-gnu; do
  grep -qx "$t" <<<"$installed" || quiet rustup target add "$t"
done
python3 -m ziglang version >/dev/null 2>&1 ||
  quiet python3 -m pip install --quiet --disable-pip-version-check ziglang

# --- the Apple target: clippy -----------------------------------------------------------
# Build scripts of dependencies compile C for the target even for a check: zig's clang with
# its bundled macOS headers stands in for Xcode's.
export CC_aarch64_apple_darwin="$root/tools/ci/zig-cc-aarch64-macos"
export AR_aarch64_apple_darwin="$root/tools/ci/zig-ar"
echo "aarch64-apple-darwin: clippy"
cargo clippy --release --target aarch64-apple-darwin --all-targets -- -D warnings

# --- Linux on aarch64: clippy, then the tests under qemu ----------------------------------
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
# Tests that start the handgrad binary or their own binary again (a bf16 path per process)
# go through the same emulator (tests/common: a cross-built binary cannot be exec'd here).
export HANDGRAD_TEST_RUNNER="$CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER"
echo "aarch64-unknown-linux-gnu: clippy"
cargo clippy --release --target aarch64-unknown-linux-gnu --all-targets -- -D warnings

# The subset: qemu runs this code 10-30x slower than the host, and the whole suite takes
# well over half an hour there. Kept: the unit tests (every kernel against its reference,
# int8 dot products, packing), the conformance suite (every operation and block of the CPU
# backend in fp32, bf16 on the portable path, and fp32 through the CBLAS calls that use
# Accelerate on a Mac, against the fake), the kernel gradient checks, the model gradient
# checks of a Llama (GQA, rotate-half RoPE, tied) and a Qwen3 (q/k norm, wide heads,
# untied), the model parity goldens, the KV cache, and training end to end (it learns;
# exact resume in fp32 and bf16; interrupt; damaged checkpoint). Skipped, each slow under
# qemu and exercising no code of its own on aarch64: the two other model gradient checks
# (same kernels, other pairings and tying: 100 s), the compacted-vocabulary gradient
# check (80 s), the check that the gradient check catches a bug (40 s), and the bf16 loss
# curve against fp32 (over 15 minutes: 200 + 60 training steps of the bf16 emulation).
# Tests through the handgrad binary (CLI, data, formats, tokenizers, reliability, the
# dashboard) test platform-independent code, and run on x86-64.
echo "aarch64-unknown-linux-gnu: tests under qemu"
cargo test --release --target aarch64-unknown-linux-gnu --no-fail-fast \
  --lib --test backend_conformance --test gradcheck_kernels --test gradcheck_model \
  --test model_parity --test kv_cache --test train_e2e -- \
  --skip tiny_llama_interleaved_untied --skip tiny_qwen3_interleaved_tied \
  --skip tiny_with_compacted_vocabulary --skip the_check_catches_the_original_rmsnorm_backward_bug \
  --skip bf16_matmuls_track_the_fp32_loss_curve_on_every_path "$@"
