#!/usr/bin/env python3
"""What DiLoCo costs in loss: the same model, data, tokens and updates trained on 2 ranks with
exact data parallelism (gradients summed every update) and with DiLoCo at several H (each rank
alone for H updates, then an outer step), compared on the validation loss at the end.

Usage (handgrad built with --features mpi; Open MPI's mpirun):

    python3 tools/net/diloco_tradeoff.py --handgrad target/release/handgrad \
        --model small --batch 8 --steps 1000 --sync-every 10,50,100

Every run is `mpirun -np 2 handgrad train --model M --batch B --steps N` on the built-in
stories (so 2 x B sequences per update), with the default learning-rate schedule. Prints a
markdown table: mode (data parallel with f32 and with bf16 gradients, DiLoCo at each H), the
final validation loss of each seed and their mean, the mean training loss of the last 10% of
updates, and how many times the ranks exchanged the model's size of data.
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


def events(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "events.jsonl").read_text().splitlines()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--handgrad", required=True)
    ap.add_argument("--model", default="small")
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank per update")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--sync-every", default="10,50,100", help="DiLoCo H values, comma-separated")
    ap.add_argument("--threads", type=int, default=1, help="threads per rank")
    ap.add_argument("--seeds", default="1337,7",
                    help="seeds (initial weights and data order), comma-separated: the spread "
                         "between seeds is the noise the differences are compared with")
    args = ap.parse_args()
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    runs = [("data parallel", [], 1), ("data parallel, bf16 gradients", ["--grad-comm", "bf16"], 1)]
    runs += [
        (f"DiLoCo H={h}", ["--distributed-mode", "diloco", "--sync-every", h], int(h))
        for h in args.sync_every.split(",")
    ]
    seeds = [int(x) for x in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="hg-diloco-") as tmp:
        for name, extra, h in runs:
            vals, trains = [], []
            for seed in seeds:
                run_dir = Path(tmp) / "run"
                cmd = ["mpirun", "-np", "2", "--oversubscribe", args.handgrad, "train",
                       "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
                       "--steps", str(args.steps), "--threads", str(args.threads), "--plain",
                       "--sample-tokens", "0", "--seed", str(seed), "--run-dir", str(run_dir)]
                p = subprocess.run(cmd + extra, env=env, capture_output=True, text=True)
                if p.returncode != 0:
                    sys.exit(f"{name} failed:\n{p.stdout}\n{p.stderr}")
                ev = events(run_dir)
                shutil.rmtree(run_dir)
                losses = [e["loss"] for e in ev if e.get("event") == "step"]
                val = [e["val_loss"] for e in ev if e.get("event") == "eval"]
                vals.append(val[-1] if val else float("nan"))
                trains.append(statistics.mean(losses[-max(1, len(losses) // 10):]))
                print(f"{name:<30} seed {seed}: val {vals[-1]:.4f} train {trains[-1]:.4f}",
                      file=sys.stderr)
            exchanges = args.steps // h + (1 if args.steps % h else 0)
            rows.append((name, vals, statistics.mean(vals), statistics.mean(trains), exchanges))
    base = rows[0][2]
    print(f"\n{args.model}, 2 ranks x --batch {args.batch} --seq {args.seq}, "
          f"{args.steps} updates ({2 * args.batch * args.seq * args.steps:,} tokens), "
          f"seeds {args.seeds}\n")
    print("| mode | validation loss at the end, per seed | mean | vs data parallel "
          "| training loss, last 10% (mean) | model-sized exchanges |")
    print("|---|---|---:|---:|---:|---:|")
    for name, vals, mean, train, ex in rows:
        per = " / ".join(f"{v:.4f}" for v in vals)
        print(f"| {name} | {per} | {mean:.4f} | {mean - base:+.4f} | {train:.4f} | {ex} |")


if __name__ == "__main__":
    main()
