#!/usr/bin/env python3
"""Per-update time of data-parallel training under simulated networks, for the four ways
handgrad's ranks can exchange: gradients summed after the backward pass (blocking), summed
while it runs (overlapped, the default), overlapped in bf16, and DiLoCo.

Usage (as root, handgrad built with --features mpi):

    python3 tools/net/measure_modes.py --handgrad target/release/handgrad \
        --rates 1gbit,10gbit --model stories110m --batch 2 --seq 256

Each (rate, mode) runs `handgrad train` on 2 ranks through `simulate_network.sh` (each rank in
its own network namespace, the link shaped to the rate in each direction) and reads the run's
`events.jsonl`. Data-parallel modes: the median `ms` of the step events after the first (the
first update warms up). DiLoCo: a run of 2K updates with outer steps after updates K and 2K
(K = --diloco-steps / 2, at least 2); the per-update time at H is `inner + sync / H`, with
`inner` the median of the updates without an outer step (but the first) and `sync` what the
last update took beyond it. "shm" in --rates runs without the simulated network (Open MPI's shared memory).
Prints a markdown table.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

MODES = {
    "blocking": ["--no-overlap"],
    "overlapped": [],
    "bf16": ["--grad-comm", "bf16"],
}


def steps(run_dir):
    """(ms, exposed allreduce ms) of each step event."""
    out = []
    for line in (Path(run_dir) / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e.get("event") != "step":
            continue
        comm = sum(k["ms"] for k in e.get("kernels", []) if k["kernel"] == "allreduce")
        out.append((e["ms"], comm))
    return out


def run(a, rate, extra, run_dir, n_steps):
    cmd = [
        a.handgrad, "train", "--model", a.model, "--batch", str(a.batch), "--seq", str(a.seq),
        "--steps", str(n_steps), "--threads", str(a.threads), "--plain", "--sample-tokens", "0",
        "--eval-every", "0", "--save-every", "0", "--run-dir", str(run_dir),
    ] + extra
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    if rate == "shm":
        full = ["mpirun", "-np", "2", "--oversubscribe"] + cmd
    else:
        full = [str(HERE / "simulate_network.sh"), "--rate", rate, "--"] + cmd
    p = subprocess.run(full, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed ({rate}, {extra}):\n{p.stdout}\n{p.stderr}")
    s = steps(run_dir)
    shutil.rmtree(run_dir)  # checkpoints of a large model take gigabytes
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--handgrad", required=True, help="handgrad binary built with --features mpi")
    ap.add_argument("--rates", default="1gbit,10gbit", help="comma-separated tc rates, or shm")
    ap.add_argument("--model", default="stories110m")
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank per update")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="threads per rank")
    ap.add_argument("--steps", type=int, default=4, help="updates of each data-parallel run")
    ap.add_argument("--diloco-steps", type=int, default=6)
    ap.add_argument("--modes", default="blocking,overlapped,bf16,diloco",
                    help="which of blocking, overlapped, bf16, diloco to run")
    ap.add_argument("--sync-every", type=int, default=50, help="DiLoCo's H for the table")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="hg-netmodes-") as tmp:
        for rate in args.rates.split(","):
            for name, extra in MODES.items():
                if name not in args.modes.split(","):
                    continue
                run_dir = Path(tmp) / f"{rate}-{len(rows)}"
                s = run(args, rate, extra, run_dir, args.steps)[1:]
                ms = statistics.median(x for x, _ in s)
                comm = statistics.median(c for _, c in s)
                label = "overlapped, bf16" if name == "bf16" else name
                rows.append((rate, label, ms, comm, ""))
                print(f"{rate:>7} {name:<18} {ms:9.0f} ms/update, waiting {comm:8.0f} ms",
                      file=sys.stderr)
            if "diloco" not in args.modes.split(","):
                continue
            # Outer steps after updates K and 2K: the second one is timed (the first also
            # allocates the transfer buffers); inner updates are the others but the first.
            k = max(args.diloco_steps // 2, 2)
            run_dir = Path(tmp) / f"{rate}-diloco"
            extra = ["--distributed-mode", "diloco", "--sync-every", str(k)]
            s = run(args, rate, extra, run_dir, 2 * k)
            inner = statistics.median(x for i, (x, _) in enumerate(s) if i not in (0, k - 1, 2 * k - 1))
            sync = max(s[-1][0] - inner, 0.0)
            h = args.sync_every
            per = inner + sync / h
            rows.append((rate, f"DiLoCo H={h}", per, sync / h,
                         f"inner update {inner:.0f} ms, outer step {sync:.0f} ms"))
            print(f"{rate:>7} DiLoCo H={h:<9} {per:9.0f} ms/update (outer step {sync:.0f} ms)",
                  file=sys.stderr)
    print(f"\n{args.model}, 2 ranks x --batch {args.batch} --seq {args.seq}, "
          f"{args.threads} thread(s) per rank\n")
    print("| link | mode | ms per update | waiting for the network, ms per update | note |")
    print("|---|---|---:|---:|---|")
    for rate, name, ms, comm, note in rows:
        print(f"| {rate} | {name} | {ms:.0f} | {comm:.0f} | {note} |")


if __name__ == "__main__":
    main()
