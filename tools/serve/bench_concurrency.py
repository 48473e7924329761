#!/usr/bin/env python3
"""Throughput of `handgrad serve` with N concurrent streaming clients against the same N
requests one after another, alternating rounds in one run (hosts are shared; compare within
a run only).

    handgrad serve --model MODEL --port 8080 &
    python3 tools/serve/bench_concurrency.py --base-url http://127.0.0.1:8080/v1 --clients 8

Each request asks for --max-tokens tokens at temperature 0.8 with its own seed; throughput is
the completion tokens the server reports, summed, over the wall time. Prints one line per
round and a JSON summary.
"""

import argparse
import json
import statistics
import threading
import time

import openai


def one(client, model, i, max_tokens, out):
    t0 = time.perf_counter()
    first = None
    n = 0
    for ch in client.completions.create(
        model=model, prompt=f"Once upon a time, story {i}:", max_tokens=max_tokens,
        temperature=0.8, seed=1000 + i, stream=True, stream_options={"include_usage": True},
    ):
        if ch.choices and ch.choices[0].text and first is None:
            first = time.perf_counter() - t0
        if ch.usage is not None:
            n = ch.usage.completion_tokens
    out[i] = (n, first if first is not None else float("nan"), time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.base_url, api_key="none", max_retries=0, timeout=600)
    model = a.model or client.models.list().data[0].id
    one(client, model, 999, 8, {})  # warm up
    seq_rates, conc_rates, ttft = [], [], []
    for r in range(a.rounds):
        out = {}
        t0 = time.perf_counter()
        for i in range(a.clients):
            one(client, model, i, a.max_tokens, out)
        dt = time.perf_counter() - t0
        seq = sum(v[0] for v in out.values()) / dt
        out = {}
        threads = [threading.Thread(target=one, args=(client, model, i, a.max_tokens, out))
                   for i in range(a.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dt = time.perf_counter() - t0
        conc = sum(v[0] for v in out.values()) / dt
        ttft.append(statistics.median(v[1] for v in out.values()))
        seq_rates.append(seq)
        conc_rates.append(conc)
        print(f"round {r}: one at a time {seq:.1f} tok/s, {a.clients} at once {conc:.1f} tok/s "
              f"({conc / seq:.2f}x), median time to first token {ttft[-1] * 1000:.0f} ms", flush=True)
    ratios = [c / s for c, s in zip(conc_rates, seq_rates)]
    print(json.dumps({
        "clients": a.clients, "max_tokens": a.max_tokens,
        "sequential_tok_s": statistics.median(seq_rates),
        "concurrent_tok_s": statistics.median(conc_rates),
        "ratio": statistics.median(ratios),
    }))


if __name__ == "__main__":
    main()
