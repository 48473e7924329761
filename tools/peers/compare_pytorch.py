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
    python3 tools/peers/compare_pytorch.py --model qwen3-0.6b --batch 1 --seq 256 --no-decode
Qwen3 shapes (head_dim apart from hidden_size / heads, GQA, RMSNorm of the query and key heads)
are modelled from the same config.
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


class Shapes:
    """The shapes of a handgrad preset or config.json, from `handgrad info --json`."""

    def __init__(self, model):
        c = run_handgrad(["info", "--model", model, "--json"])
        self.d, self.layers = c["hidden_size"], c["num_hidden_layers"]
        self.h, self.kvh = c["num_attention_heads"], c["num_key_value_heads"]
        self.hd = c.get("head_dim") or self.d // self.h
        self.ffn, self.vocab = c["intermediate_size"], c["vocab_size"]
        self.eps = c.get("rms_norm_eps", 1e-5)
        self.theta = c.get("rope_theta", 10000.0)
        # Qwen3: RMSNorm of every query and key head before RoPE.
        self.qk_norm = c.get("model_type") == "qwen3"
        if not c.get("tie_word_embeddings", True):
            sys.exit(f"{model}: this script models tied input and output embeddings only")

    def __str__(self):
        return (f"dim {self.d}, {self.layers} layers, {self.h}/{self.kvh} heads of {self.hd}, "
                f"ffn {self.ffn}, vocab {self.vocab}{', q/k norm' if self.qk_norm else ''}")


class Block(nn.Module):
    def __init__(self, s):
        super().__init__()
        d, h, kvh = s.d, s.h, s.kvh
        self.h, self.kvh, self.hd = h, kvh, s.hd
        self.n1 = nn.RMSNorm(d, eps=s.eps)
        self.n2 = nn.RMSNorm(d, eps=s.eps)
        self.qn = nn.RMSNorm(s.hd, eps=s.eps) if s.qk_norm else None
        self.kn = nn.RMSNorm(s.hd, eps=s.eps) if s.qk_norm else None
        self.wq = nn.Linear(d, h * self.hd, bias=False)
        self.wk = nn.Linear(d, kvh * self.hd, bias=False)
        self.wv = nn.Linear(d, kvh * self.hd, bias=False)
        self.wo = nn.Linear(h * self.hd, d, bias=False)
        ffn = s.ffn
        self.w1 = nn.Linear(d, ffn, bias=False)
        self.w3 = nn.Linear(d, ffn, bias=False)
        self.w2 = nn.Linear(ffn, d, bias=False)

    def rope(self, x, cos, sin):
        x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2 :]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, x, cos, sin, cache=None, pos=0):
        b, t, _ = x.shape
        y = self.n1(x)
        q = self.wq(y).view(b, t, self.h, self.hd)
        k = self.wk(y).view(b, t, self.kvh, self.hd)
        if self.qn is not None:
            q, k = self.qn(q), self.kn(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
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
    def __init__(self, s, max_seq=1024):
        super().__init__()
        self.emb = nn.Embedding(s.vocab, s.d)
        self.blocks = nn.ModuleList([Block(s) for _ in range(s.layers)])
        self.norm = nn.RMSNorm(s.d, eps=s.eps)
        hd = s.hd
        inv = 1.0 / (s.theta ** (torch.arange(0, hd, 2).float() / hd))
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
def time_decode(model, s, tokens, dtype):
    model = model.to(dtype)
    caches = [(torch.zeros(1, s.kvh, tokens + 1, s.hd, dtype=dtype),
               torch.zeros(1, s.kvh, tokens + 1, s.hd, dtype=dtype))
              for _ in range(s.layers)]
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
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--no-decode", action="store_true", help="time training steps only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    s = Shapes(args.model)
    precisions = [p for p in args.precisions.split(",") if p]
    print(f"torch {torch.__version__}, {args.threads} threads, {args.model} ({s}), "
          f"batch {args.batch} x seq {args.seq}")

    rows = []
    details = []
    for precision in precisions:
        model = Model(s, max_seq=max(1024, args.seq + 1))
        torch_s = time_train(model, args.batch, args.seq, s.vocab, precision == "bf16", args.steps)
        del model
        hg = handgrad(args, "train", ["--batch", str(args.batch), "--seq", str(args.seq),
                                      "--steps", str(args.steps), "--precision", precision])
        rows.append((f"train step, {precision}", torch_s * 1e3, hg["median_ms"], "ms"))
        details.append(f"handgrad {precision} step: {hg['gflops']:.1f} GFLOP/s = {100 * hg['mfu']:.1f}% of the "
                       f"measured {precision} peak {hg['peak_gflops']:.1f} GFLOP/s")
    for precision in [] if args.no_decode else precisions:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        model = Model(s, max_seq=max(1024, args.decode_tokens + 1))
        torch_tps = time_decode(model, s, args.decode_tokens, dtype)
        del model
        hg = handgrad(args, "generate", ["--tokens", str(args.decode_tokens), "--weights", precision])
        rows.append((f"decode, {precision} weights", torch_tps, hg["decode_tokens_per_s"], "tok/s"))
        details.append(f"handgrad {precision} decode: {100 * hg['roofline_fraction']:.1f}% of the roofline "
                       f"({hg['bandwidth_gb_s']:.1f} GB/s); prefill {hg['prefill_tokens_per_s']:.0f} tok/s")

    print(f"\n{'':28} {'PyTorch':>12} {'handgrad':>12} {'speed-up':>9}")
    for name, t, hgv, unit in rows:
        ratio = t / hgv if unit == "ms" else hgv / t
        print(f"{name:28} {t:>9.1f} {unit:<3}{hgv:>9.1f} {unit:<3} {ratio:>8.2f}x")
    print()
    for line in details:
        print(line)

if __name__ == "__main__":
    main()
