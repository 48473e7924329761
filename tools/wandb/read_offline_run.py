"""Prints the logged history of an offline W&B run as JSON: the `(step, train/loss)` pairs.

Reads the run's `.wandb` file (W&B's record log: a 7-byte header `:W&B`, then 32 KiB blocks of
records, each a 7-byte header of CRC-32, length and type (full, first, middle, last) and a
piece of a `wandb_internal_pb2.Record`) with wandb's own protocol buffers. Used by
`tests/loggers.rs`. Usage: python3 read_offline_run.py RUN_DIR
"""
import glob, json, struct, sys
from wandb.proto import wandb_internal_pb2

def records(path):
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - (pos % block)
        if left < 7:
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""

path = glob.glob(sys.argv[1] + "/wandb/offline-run-*/run-*.wandb")[0]
rows = []
for raw in records(path):
    rec = wandb_internal_pb2.Record(); rec.ParseFromString(raw)
    if rec.WhichOneof("record_type") == "history":
        rows.append({(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in rec.history.item})
print(json.dumps([(r.get("_step"), r.get("train/loss")) for r in rows if "train/loss" in r]))
