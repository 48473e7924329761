#!/usr/bin/env python3
"""Side-by-side decoding: handgrad against llama2.c's run.c (fp32) and runq.c (int8 Q8_0).

llama2.c is never vendored: pass a source snapshot (a clone of karpathy/llama2.c) with
--llama2c. The script

1. builds run.c and runq.c from that snapshot as llama2.c's Makefile `runomp` target does
   (gcc -Ofast -fopenmp -march=native), into --work;
2. tokenizes the TinyStories sample of ../shared/fixtures with the Llama 2 tokenizer.bin and
   trains a stories15m-shaped model on it with handgrad (the interop model), and a
   stories110m-shaped model for one update (the speed model: decode speed does not depend on
   the values of the weights);
3. exports each with `handgrad convert` to llama2.c v0 (run.c) and v2 (`--quant q8`, runq.c);
4. interop: greedy decoding (temperature 0) of the same prompt by handgrad and run.c on the
   same v0 file must give the same text for at least --agree tokens (and handgrad --weights q8
   against runq.c on the v2 file is reported);
5. speed: runs handgrad and the peer alternately, --rounds times each, on the stories110m
   files with --threads threads (OMP_NUM_THREADS for llama2.c), and prints the median decode
   speeds and ratios, with the memory-bandwidth roofline of `handgrad bench generate` measured
   in the same invocation.

Usage:
    cargo build --release
    python3 tools/peers/compare_llama2c.py --llama2c /path/to/llama2.c --threads 2
Exit status 1 when the greedy tokens disagree before --agree tokens.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EXE = os.path.join(ROOT, "target", "release", "handgrad")
FIXTURES = os.path.abspath(os.path.join(ROOT, "..", "shared", "fixtures"))
PROMPT = "Once upon a time, there was a little girl named Lily."


def sh(cmd, env=None, cwd=None):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def handgrad(args, threads=None):
    cmd = [EXE] + args
    if threads is not None:
        cmd += ["--threads", str(threads)]
    return sh(cmd)


def build_peers(src, work):
    bins = {}
    for name in ["run", "runq"]:
        c = os.path.join(src, f"{name}.c")
        if not os.path.exists(c):
            sys.exit(f"{c} not found: --llama2c must be a llama2.c source folder")
        exe = os.path.join(work, name)
        sh(["gcc", "-Ofast", "-fopenmp", "-march=native", c, "-lm", "-o", exe])
        bins[name] = exe
    return bins


def train(work, name, model, steps, extra):
    run = os.path.join(work, name)
    latest = os.path.join(run, "checkpoints", "latest")
    if not os.path.exists(latest):
        if os.path.exists(run):
            shutil.rmtree(run)
        handgrad(["train", "--model", model, "--data", os.path.join(work, "data"),
                  "--steps", str(steps), "--run-dir", run, "--plain", "--sample-tokens", "0"]
                 + extra)
    v0 = os.path.join(work, f"{name}_v0.bin")
    v2 = os.path.join(work, f"{name}_q8.bin")
    handgrad(["convert", latest, v0])
    handgrad(["convert", latest, v2, "--quant", "q8"])
    return v0, v2


def peer_text(exe, model, tok, steps, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = sh([exe, model, "-z", tok, "-t", "0", "-n", str(steps), "-i", PROMPT], env=env)
    rate = re.search(r"achieved tok/s: ([0-9.]+)", out.stderr)
    return out.stdout, float(rate.group(1)) if rate else None


def handgrad_text(model, tok, tokens, weights, threads):
    out = handgrad(["generate", "--model", model, "--tokenizer", tok, "--temperature", "0",
                    "--max-tokens", str(tokens), "--prompt", PROMPT, "--weights", weights],
                   threads)
    rate = re.search(r"decode ([0-9.]+) tok/s", out.stderr)
    return out.stdout, float(rate.group(1)) if rate else None


def agreement(a, b):
    """Characters the two texts share from the start, ignoring a leading space and the end."""
    a, b = a.strip(), b.strip()
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def count_tokens(text, tok):
    out = subprocess.run([EXE, "tokenizer", "encode", "--tokenizer", tok], input=text,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"handgrad tokenizer encode failed:\n{out.stderr}")
    return len(json.loads(out.stdout))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama2c", required=True, help="llama2.c source folder (run.c, runq.c)")
    ap.add_argument("--work", default="/tmp/handgrad-vs-llama2c")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=200, help="tokens decoded per speed run")
    ap.add_argument("--agree", type=int, default=64, help="greedy tokens that must agree")
    ap.add_argument("--agree-steps", type=int, default=300,
                    help="updates of the stories15m interop model")
    args = ap.parse_args()
    if not os.path.exists(EXE):
        sys.exit("build handgrad first: cargo build --release")
    os.makedirs(args.work, exist_ok=True)
    tok = os.path.join(FIXTURES, "llama2", "tokenizer.bin")
    text = os.path.join(FIXTURES, "tinystories", "valid-sample.txt")
    if not os.path.exists(tok):
        sys.exit(f"{tok} not found (the shared fixtures)")
    bins = build_peers(args.llama2c, args.work)
    data = os.path.join(args.work, "data")
    if not os.path.exists(os.path.join(data, "val.bin")):
        handgrad(["prepare", text, "--tokenizer", tok, "--out", data, "--val-fraction", "0.1"])

    # Interop: the same v0 file, greedy, both tools.
    a_v0, a_q8 = train(args.work, "interop15m", "stories15m", args.agree_steps,
                       ["--batch", "8", "--seq", "256"])
    want = args.agree + 16
    ours, _ = handgrad_text(a_v0, tok, want, "fp32", args.threads)
    prompt_tokens = count_tokens(PROMPT, tok) + 1  # with BOS
    theirs, _ = peer_text(bins["run"], a_v0, tok, prompt_tokens + want, args.threads)
    same = agreement(ours, theirs)
    agreed = count_tokens(same, tok) - (prompt_tokens - 1)
    ours_q, _ = handgrad_text(a_q8, tok, want, "q8", args.threads)
    theirs_q, _ = peer_text(bins["runq"], a_q8, tok, prompt_tokens + want, args.threads)
    agreed_q = count_tokens(agreement(ours_q, theirs_q), tok) - (prompt_tokens - 1)
    print(f"interop (stories15m trained {args.agree_steps} updates, greedy):")
    print(f"  handgrad vs run.c  on the v0 file: {agreed} generated tokens agree "
          f"({'at least' if agreed >= want - 2 else 'then they differ;'} of {want})")
    print(f"  handgrad q8 vs runq.c on the v2 file: {agreed_q} agree")
    print(f"  text: {same[:160]!r}")

    # Speed: stories110m shapes, alternately.
    s_v0, s_q8 = train(args.work, "speed110m", "stories110m", 1,
                       ["--batch", "1", "--seq", "32", "--warmup", "0"])
    rates = {k: [] for k in ["handgrad fp32", "handgrad bf16", "handgrad q8", "run.c", "runq.c"]}
    n = args.tokens
    for _ in range(args.rounds):
        rates["run.c"].append(peer_text(bins["run"], s_v0, tok, n, args.threads)[1])
        rates["handgrad fp32"].append(handgrad_text(s_v0, tok, n, "fp32", args.threads)[1])
        rates["handgrad bf16"].append(handgrad_text(s_v0, tok, n, "bf16", args.threads)[1])
        rates["runq.c"].append(peer_text(bins["runq"], s_q8, tok, n, args.threads)[1])
        rates["handgrad q8"].append(handgrad_text(s_q8, tok, n, "q8", args.threads)[1])
    med = {k: statistics.median(v) for k, v in rates.items()}
    # The bandwidth roofline of each format, measured now: bytes per token / read bandwidth.
    roof = {}
    for w in ["fp32", "bf16", "q8"]:
        b = json.loads(handgrad(["bench", "generate", "--model", "stories110m", "--prompt", "1",
                                 "--tokens", "16", "--weights", w, "--json"],
                                args.threads).stdout)
        roof[w] = (b["bandwidth_gb_s"], b["weight_bytes_per_token"])
    print(f"\ndecode, stories110m shapes, batch 1, {args.threads} threads, median of "
          f"{args.rounds} alternating rounds of {n} tokens:")
    print("| tool | weights | tok/s | vs peer | % of bandwidth roofline |")
    print("|---|---|---:|---:|---:|")
    for k in ["run.c", "handgrad fp32", "handgrad bf16", "runq.c", "handgrad q8"]:
        w = "q8" if "q" in k.split()[-1] else ("bf16" if "bf16" in k else "fp32")
        peer = med["runq.c"] if w == "q8" else med["run.c"]
        bw, per_token = roof[w]
        roofline = f"{100 * med[k] * per_token / (bw * 1e9):.0f}%"
        vs = "" if k in ("run.c", "runq.c") else f"{med[k] / peer:.2f}x"
        print(f"| {k} | {w} | {med[k]:.1f} | {vs} | {roofline} |")
    print(f"(read bandwidth measured by handgrad bench generate: {roof['fp32'][0]:.1f} GB/s; "
          f"the roofline counts the matrices' bytes per token)")
    print(f"bf16 vs our fp32: {med['handgrad bf16'] / med['handgrad fp32']:.2f}x")
    if agreed < args.agree:
        print(f"FAIL: only {agreed} greedy tokens agree with run.c (want {args.agree})")
        sys.exit(1)


if __name__ == "__main__":
    main()
