"""handgrad's Weights & Biases sidecar: reads handgrad's event records (one JSON object per
line, as in events.jsonl) on stdin and logs them with the official `wandb` package.

Started by `handgrad train --wandb` (the script is built into the binary); it can also replay a
finished run: `python3 tools/wandb/handgrad_wandb.py --project P < runs/x/events.jsonl`.
"""

import argparse
import json
import math
import sys


def finite(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", default="handgrad")
    ap.add_argument("--name", default=None)
    ap.add_argument("--mode", default="online", choices=["online", "offline", "disabled"])
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    import wandb

    run = None
    samples = []
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            r = json.loads(line)
        except ValueError:
            continue
        e = r.get("event")
        if e == "run_start" and run is None:
            run = wandb.init(
                project=args.project,
                name=args.name,
                mode=args.mode,
                dir=args.dir,
                config={
                    "model": r.get("model"),
                    "train": r.get("train"),
                    "backend": r.get("backend"),
                    "params": r.get("params"),
                    "data": r.get("data"),
                    "tokens_per_update": r.get("tokens_per_update"),
                },
            )
            continue
        if run is None:
            continue
        if e == "step":
            d = {
                "train/loss": finite(r.get("loss")),
                "train/lr": r.get("lr"),
                "train/grad_norm": finite(r.get("grad_norm")),
                "train/ms_per_update": r.get("ms"),
                "train/tokens_per_s": r.get("tokens_per_s"),
                "train/tokens_seen": r.get("tokens_seen"),
            }
            for k in ("loss_scale", "cpu_percent", "power_w", "energy_j_per_token", "rss_bytes"):
                if r.get(k) is not None:
                    d[f"system/{k}" if k != "loss_scale" else "train/loss_scale"] = r[k]
            for k in r.get("kernels", []):
                d[f"kernels_ms/{k['kernel']}"] = k["ms"]
            run.log({k: v for k, v in d.items() if v is not None}, step=r["step"])
        elif e == "eval":
            run.log({"eval/val_loss": finite(r.get("val_loss")), "eval/best_val_loss": r.get("best_val_loss")}, step=r["step"])
        elif e == "checkpoint":
            run.log({"checkpoint/bytes": r.get("bytes"), "checkpoint/ms": r.get("ms")}, step=r["step"])
            run.summary[f"checkpoint/{r.get('kind')}"] = r.get("path")
        elif e == "sample":
            samples.append([r["step"], r.get("text", "")])
            run.log({"samples": wandb.Table(columns=["step", "text"], data=list(samples))}, step=r["step"])
        elif e == "run_error":
            run.summary["error"] = r.get("message")
        elif e == "run_end":
            for k in ("reason", "wall_s", "updates", "mean_ms_per_update", "tokens_per_s", "gflops_per_s", "final_loss", "best_val_loss", "peak_rss_bytes"):
                if r.get(k) is not None:
                    run.summary[k] = r[k]
    if run is not None:
        run.finish()


if __name__ == "__main__":
    main()
