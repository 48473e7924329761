#!/usr/bin/env python3
"""Side-by-side CPU benchmark: handgrad vs. plain PyTorch on the same machine, same threads.

Builds the same Llama-shaped model in plain PyTorch (random init, same shapes as the handgrad
preset), times one full training step (forward, loss, backward, fused AdamW) in fp32 and with
bf16 autocast, and greedy decoding with a KV cache; runs `handgrad bench train` and
`handgrad bench generate` with the same settings in the same invocation; prints the ratios.

The model's shapes come from `handgrad info --model NAME --json`, so the two sides cannot
disagree. Not part of CI (PyTorch is large). Usage:
    pip install torch
    cargo build --release
    python3 tools/peers/compare_pytorch.py --model stories110m --batch 4 --seq 256 --threads 2
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

EXE = os.path.join(os.path.dirname(__file__), "..", "..", "target", "release", "handgrad")


def run_handgrad(cmd):
    out = subprocess.run([EXE] + cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"handgrad {' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout)


def shapes(model):
    """(dim, layers, heads, kv_heads, ffn, vocab) of a handgrad preset or config.json."""
    c = run_handgrad(["info", "--model", model, "--json"])
    if c["head_dim"] * c["num_attention_heads"] != c["hidden_size"]:
        sys.exit(f"{model}: this script models head_dim = hidden_size / heads only")
    return (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
            c["num_key_value_heads"], c["intermediate_size"], c["vocab_size"])


class Block(nn.Module):
    def __init__(self, d, h, kvh, ffn):
        super().__init__()
        self.h, self.kvh, self.hd = h, kvh, d // h
        self.n1 = nn.RMSNorm(d, eps=1e-5)
        self.n2 = nn.RMSNorm(d, eps=1e-5)
        self.wq = nn.Linear(d, h * self.hd, bias=False)
        self.wk = nn.Linear(d, kvh * self.hd, bias=False)
        self.wv = nn.Linear(d, kvh * self.hd, bias=False)
        self.wo = nn.Linear(h * self.hd, d, bias=False)
        self.w1 = nn.Linear(d, ffn, bias=False)
        self.w3 = nn.Linear(d, ffn, bias=False)
        self.w2 = nn.Linear(ffn, d, bias=False)

    def rope(self, x, cos, sin):
        x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2 :]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, x, cos, sin, cache=None, pos=0):
        b, t, _ = x.shape
        y = self.n1(x)
        q = self.wq(y).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.wk(y).view(b, t, self.kvh, self.hd).transpose(1, 2)
        v = self.wv(y).view(b, t, self.kvh, self.hd).transpose(1, 2)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        if cache is not None:
            cache[0][:, :, pos : pos + t] = k
            cache[1][:, :, pos : pos + t] = v
            k, v = cache[0][:, :, : pos + t], cache[1][:, :, : pos + t]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None or t > 1,
                                           enable_gqa=self.h != self.kvh)
        x = x + self.wo(a.transpose(1, 2).reshape(b, t, -1))
        y = self.n2(x)
        return x + self.w2(F.silu(self.w1(y)) * self.w3(y))


class Model(nn.Module):
    def __init__(self, d, layers, h, kvh, ffn, vocab, max_seq=1024):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, h, kvh, ffn) for _ in range(layers)])
        self.norm = nn.RMSNorm(d, eps=1e-5)
        hd = d // h
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(max_seq).float(), inv)
        self.register_buffer("cos", torch.cat([ang.cos(), ang.cos()], -1), persistent=False)
        self.register_buffer("sin", torch.cat([ang.sin(), ang.sin()], -1), persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids, caches=None, pos=0):
        t = ids.shape[1]
        cos, sin = self.cos[pos : pos + t], self.sin[pos : pos + t]
        x = self.emb(ids)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, None if caches is None else caches[i], pos)
        return self.norm(x) @ self.emb.weight.t()


def time_train(model, batch, seq, vocab, bf16, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ids = torch.randint(0, vocab, (batch, seq + 1))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i > 0:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def time_decode(model, d, layers, kvh, h, tokens, dtype):
    model = model.to(dtype)
    hd = d // h
    caches = [(torch.zeros(1, kvh, tokens + 1, hd, dtype=dtype), torch.zeros(1, kvh, tokens + 1, hd, dtype=dtype))
              for _ in range(layers)]
    tok = torch.tensor([[1]])
    model(tok, caches, 0)
    t0 = time.perf_counter()
    for pos in range(1, tokens):
        logits = model(tok, caches, pos)
        tok = logits[:, -1:].argmax(-1)
    return (tokens - 1) / (time.perf_counter() - t0)


def handgrad(args, sub, extra):
    return run_handgrad(["bench", sub, "--model", args.model, "--threads", str(args.threads), "--json"] + extra)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="stories110m", help="a handgrad preset or config.json")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, layers, h, kvh, ffn, vocab = shapes(args.model)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.model}, batch {args.batch} x seq {args.seq}")

    rows = []
    details = []
    for precision in ["fp32", "bf16"]:
        torch_s = time_train(Model(d, layers, h, kvh, ffn, vocab), args.batch, args.seq, vocab,
                             precision == "bf16", args.steps)
        hg = handgrad(args, "train", ["--batch", str(args.batch), "--seq", str(args.seq),
                                      "--steps", str(args.steps), "--precision", precision])
        rows.append((f"train step, {precision}", torch_s * 1e3, hg["median_ms"], "ms"))
        details.append(f"handgrad {precision} step: {hg['gflops']:.1f} GFLOP/s = {100 * hg['mfu']:.1f}% of the "
                       f"measured {precision} peak {hg['peak_gflops']:.1f} GFLOP/s")
    for precision, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        torch_tps = time_decode(Model(d, layers, h, kvh, ffn, vocab), d, layers, kvh, h, args.decode_tokens, dtype)
        hg = handgrad(args, "generate", ["--tokens", str(args.decode_tokens), "--weights", precision])
        rows.append((f"decode, {precision} weights", torch_tps, hg["decode_tokens_per_s"], "tok/s"))
        details.append(f"handgrad {precision} decode: {100 * hg['roofline_fraction']:.1f}% of the roofline "
                       f"({hg['bandwidth_gb_s']:.1f} GB/s); prefill {hg['prefill_tokens_per_s']:.0f} tok/s")

    print(f"\n{'':28} {'PyTorch':>12} {'handgrad':>12} {'speed-up':>9}")
    for name, t, hgv, unit in rows:
        ratio = t / hgv if unit == "ms" else hgv / t
        print(f"{name:28} {t:>9.1f} {unit:<3}{hgv:>9.1f} {unit:<3} {ratio:>8.2f}x")
    print()
    for d in details:
        print(d)


if __name__ == "__main__":
    main()
