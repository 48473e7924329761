#!/usr/bin/env python3
"""Side-by-side prefill and decoding: handgrad against llama.cpp's llama-bench on the same GGUF shapes.

llama.cpp is never vendored: build its `llama-bench` yourself (cmake -DCMAKE_BUILD_TYPE=Release
-DGGML_NATIVE=ON, target llama-bench) and pass it with --llama-bench. The script

1. makes a model of the --model shape with handgrad: one update of `handgrad train` on the
   built-in stories (random weights; speed does not depend on their values), so the vocabulary
   is the built-in tokenizer's 1024 tokens, not Llama 2's 32000 (the classifier's share of a
   token's work is smaller than in the published stories models);
2. exports it with `handgrad convert RUN model-DTYPE.gguf --dtype DTYPE` for each of --dtypes
   (f32, bf16, q8_0);
3. per round and dtype, alternately: `llama-bench -m model-DTYPE.gguf -p PROMPT -n TOKENS
   -t THREADS -r 1 -o json` (prefill = its pp test, decode = its tg test) and
   `handgrad bench generate --model RUN --prompt PROMPT --tokens TOKENS --weights W --threads
   THREADS --json` on the same shapes (its prefill_tokens_per_s and decode_tokens_per_s),
   with the weights at the matching precision: f32 -> fp32, bf16 -> bf16, q8_0 -> q8;
4. prints the medians over --rounds as a markdown table with handgrad / llama.cpp ratios.

Both run one warm-up pass before the timed one. handgrad decodes after its prompt (the KV cache
holds PROMPT tokens); llama-bench's tg test starts from an empty cache unless --llama-depth
(then its tg runs with -d PROMPT in a second llama-bench call).

Usage:
    cargo build --release
    python3 tools/peers/compare_llamacpp.py --llama-bench /path/to/llama-bench --threads 2
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EXE = os.path.join(ROOT, "target", "release", "handgrad")
WEIGHTS = {"f32": "fp32", "bf16": "bf16", "q8_0": "q8"}


def sh(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def cpu_model():
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = (s.strip() for s in line.split(":", 1))
                    info.setdefault(k, v)
    except OSError:
        return "unknown"
    flags = set(info.get("flags", "").split())
    simd = [f for f in ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"]
            if f in flags]
    return (f"{info.get('model name', 'unknown')} (family {info.get('cpu family', '?')}, "
            f"model {info.get('model', '?')}; {os.cpu_count()} logical CPUs; "
            f"{', '.join(simd) or 'no AVX2'})")


def make_model(hg, work, model, dtypes):
    """The run folder (its config.json is what `bench generate` reads) and a GGUF per dtype."""
    run = os.path.join(work, "run")
    ggufs = {d: os.path.join(work, f"model-{d}.gguf") for d in dtypes}
    stamp = os.path.join(work, "model.txt")  # which --model the cached files are
    cached = (os.path.exists(stamp) and open(stamp).read() == model
              and os.path.exists(os.path.join(run, "config.json")))
    if not cached:
        for p in [run, stamp] + list(ggufs.values()):
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
        sh([hg, "train", "--model", model, "--steps", "1", "--batch", "1", "--seq", "32",
            "--warmup", "0", "--run-dir", run, "--plain", "--sample-tokens", "0"])
    commands = []
    for d, path in ggufs.items():
        cmd = [hg, "convert", run, path, "--dtype", d]
        commands.append(cmd)
        if not os.path.exists(path):
            if not os.path.exists(os.path.join(run, "checkpoints", "latest")):
                shutil.rmtree(run)
                os.remove(stamp)
                return make_model(hg, work, model, dtypes)
            sh(cmd)
    # The GGUFs and config.json are all that is needed: the checkpoints (weights and AdamW
    # moments, 1.3 GB for stories110m) go.
    shutil.rmtree(os.path.join(run, "checkpoints"), ignore_errors=True)
    with open(stamp, "w") as f:
        f.write(model)
    return run, ggufs, commands


def llama_cmds(exe, gguf, args):
    base = [exe, "-m", gguf, "-t", str(args.threads), "-r", "1", "-o", "json"]
    if args.llama_depth:
        return [base[:3] + ["-p", str(args.prompt), "-n", "0"] + base[3:],
                base[:3] + ["-p", "0", "-n", str(args.tokens), "-d", str(args.prompt)] + base[3:]]
    return [base[:3] + ["-p", str(args.prompt), "-n", str(args.tokens)] + base[3:]]


def llama_bench(cmds):
    """(prefill tok/s, decode tok/s, the pp test's record) from llama-bench's JSON."""
    pp = tg = None
    for cmd in cmds:
        out = sh(cmd)
        for t in json.loads(out.stdout):
            if t["n_prompt"] > 0 and t["n_gen"] == 0:
                pp = t
            elif t["n_gen"] > 0 and t["n_prompt"] == 0:
                tg = t
    if pp is None or tg is None:
        sys.exit(f"llama-bench gave no pp or tg test: {' '.join(cmds[0])}")
    return pp["avg_ts"], tg["avg_ts"], pp


def handgrad_cmd(hg, run, weights, args):
    return [hg, "bench", "generate", "--model", run, "--prompt", str(args.prompt),
            "--tokens", str(args.tokens), "--weights", weights, "--threads", str(args.threads),
            "--json"]


def handgrad_bench(cmd):
    b = json.loads(sh(cmd).stdout)
    return b["prefill_tokens_per_s"], b["decode_tokens_per_s"], b


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-bench", required=True, help="llama.cpp's llama-bench executable")
    ap.add_argument("--handgrad", default=EXE, help="handgrad executable (default: the release build)")
    ap.add_argument("--model", default="stories110m", help="a handgrad preset or config.json")
    ap.add_argument("--work", default="/tmp/handgrad-vs-llamacpp",
                    help="folder for the run and the GGUF files (reused when --model matches)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens prefilled")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded one at a time")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtypes", default="f32,bf16,q8_0", help="comma-separated: f32, bf16, q8_0")
    ap.add_argument("--llama-depth", action="store_true",
                    help="run llama.cpp's decode test after PROMPT tokens of cache (-d), as "
                         "handgrad's decode runs (a second llama-bench call per round)")
    ap.add_argument("--clean", action="store_true", help="remove --work at the end")
    args = ap.parse_args()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in WEIGHTS:
            sys.exit(f"--dtypes: {d} is not one of {', '.join(WEIGHTS)}")
    hg = os.path.abspath(args.handgrad)
    lb = os.path.abspath(args.llama_bench)
    for exe, hint in [(hg, "build handgrad first: cargo build --release"),
                      (lb, "--llama-bench: build llama.cpp's llama-bench target")]:
        if not os.access(exe, os.X_OK):
            sys.exit(f"{exe} not found: {hint}")
    os.makedirs(args.work, exist_ok=True)

    run, ggufs, convert_cmds = make_model(hg, args.work, args.model, dtypes)
    cfg = json.load(open(os.path.join(run, "config.json")))
    need = args.prompt + args.tokens + 1
    if need > cfg.get("max_position_embeddings", need):
        sys.exit(f"--prompt + --tokens + 1 = {need} exceed the model's "
                 f"{cfg['max_position_embeddings']} positions")

    lcmds = {d: llama_cmds(lb, ggufs[d], args) for d in dtypes}
    hcmds = {d: handgrad_cmd(hg, run, WEIGHTS[d], args) for d in dtypes}
    rates = {(tool, d, kind): [] for tool in ["handgrad", "llama.cpp"] for d in dtypes
             for kind in ["prefill", "decode"]}
    info = {}
    for r in range(args.rounds):
        for d in dtypes:
            p, g, rec = llama_bench(lcmds[d])
            rates[("llama.cpp", d, "prefill")].append(p)
            rates[("llama.cpp", d, "decode")].append(g)
            info[("llama.cpp", d)] = rec
            p, g, rec = handgrad_bench(hcmds[d])
            rates[("handgrad", d, "prefill")].append(p)
            rates[("handgrad", d, "decode")].append(g)
            info[("handgrad", d)] = rec
            print(f"round {r + 1}/{args.rounds} {d}: llama.cpp pp {rates[('llama.cpp', d, 'prefill')][-1]:.1f} "
                  f"tg {rates[('llama.cpp', d, 'decode')][-1]:.1f}, handgrad prefill {p:.1f} "
                  f"decode {g:.1f} tok/s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in rates.items()}

    first_lc = info[("llama.cpp", dtypes[0])]
    first_hg = info[("handgrad", dtypes[0])]
    print(f"host CPU: {cpu_model()}")
    print(f"llama.cpp: {lb} (build {first_lc['build_commit']}, number {first_lc['build_number']}; "
          f"cpu_info {first_lc['cpu_info']!r}, backends {first_lc['backends']})")
    print(f"handgrad: {hg} (commit {first_hg['machine'].get('commit', '?')}, "
          f"{first_hg['machine'].get('rustc', '')})")
    print(f"model: {args.model} shapes, dim {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
          f"vocabulary {cfg['vocab_size']} (the built-in data's tokenizer; "
          f"{'tied' if cfg.get('tie_word_embeddings') else 'untied'} embeddings), "
          f"{first_lc['model_n_params'] / 1e6:.1f}M parameters; random weights (1 update)")
    print("\ncommands:")
    for c in convert_cmds:
        print("  " + " ".join(c))
    for d in dtypes:
        for c in lcmds[d]:
            print("  " + " ".join(c))
        print("  " + " ".join(hcmds[d]))
    depth = (f"llama.cpp's decode with -d {args.prompt}" if args.llama_depth
             else "llama.cpp's decode from an empty cache, handgrad's after the prompt")
    print(f"\n{args.model} shapes (vocabulary {cfg['vocab_size']}), batch 1, {args.threads} threads, "
          f"prefill {args.prompt} tokens, decode {args.tokens} tokens ({depth}), median of "
          f"{args.rounds} alternating rounds, tokens/s; ratio = handgrad / llama.cpp:\n")
    print("| dtype | handgrad prefill tok/s | llama.cpp prefill | ratio "
          "| handgrad decode | llama.cpp decode | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for d in dtypes:
        hp, lp = med[("handgrad", d, "prefill")], med[("llama.cpp", d, "prefill")]
        hd, ld = med[("handgrad", d, "decode")], med[("llama.cpp", d, "decode")]
        print(f"| {d} ({WEIGHTS[d]}) | {hp:.1f} | {lp:.1f} | {hp / lp:.2f}x "
              f"| {hd:.1f} | {ld:.1f} | {hd / ld:.2f}x |")
    print()
    for d in dtypes:
        h, l = info[("handgrad", d)], info[("llama.cpp", d)]
        print(f"{d}: GGUF {l['model_size'] / 1e6:.1f} MB (llama.cpp: {l['model_type']}); handgrad "
              f"streams {h['weight_bytes_per_token'] / 1e6:.1f} MB per decoded token, read "
              f"bandwidth {h['bandwidth_gb_s']:.1f} GB/s -> decode roofline "
              f"{h['roofline_tokens_per_s']:.0f} tok/s")
    for tool in ["handgrad", "llama.cpp"] if args.rounds > 1 else []:
        spread = [f"{d} {k} {min(v):.0f}-{max(v):.0f}" for (t, d, k), v in rates.items()
                  if t == tool]
        print(f"{tool} range over rounds: {', '.join(spread)}")
    if args.clean:
        shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
