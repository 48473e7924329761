#!/usr/bin/env python3
"""Run a GGUF file in llama.cpp (through PyPI `llama-cpp-python`) and print, as JSON, how it
tokenizes a text and its greedy continuation of given token ids, for tests/gguf_export.rs to
compare with handgrad.

    python3 tools/gguf/llama_cpp_greedy.py MODEL.gguf --text TEXT --ids 1,2,3 --n 16

Output: {"tokens": ids of TEXT (BOS added when the file says so, special tokens not parsed),
"logits": llama.cpp's logits after IDS (the next token's, before any sampling),
"continuation": the N ids llama.cpp picks greedily (top-k 1, no penalties) after IDS}.
Exit status: 0 done, 1 llama.cpp could not load or run the file, 2 llama_cpp is missing.
"""

import argparse
import json
import sys

try:
    import llama_cpp
except ImportError as e:
    print(f"missing Python package: {e} (pip install llama-cpp-python)", file=sys.stderr)
    sys.exit(2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--text", required=True)
    ap.add_argument("--ids", required=True, help="comma-separated prompt token ids")
    ap.add_argument("--n", type=int, default=16)
    a = ap.parse_args()
    ids = [int(x) for x in a.ids.split(",") if x]
    try:
        llm = llama_cpp.Llama(model_path=a.model, n_ctx=len(ids) + a.n + 8, n_batch=64,
                              n_threads=2, seed=0, logits_all=True, verbose=False,
                              # f32 KV cache (llama.cpp's default is f16), as handgrad's
                              type_k=0, type_v=0)
    except Exception as e:  # noqa: BLE001
        print(f"llama.cpp could not load {a.model}: {e}", file=sys.stderr)
        return 1
    add_bos = llm._model.add_bos_token() if hasattr(llm._model, "add_bos_token") else True
    tokens = llm.tokenize(a.text.encode("utf-8"), add_bos=add_bos, special=False)
    llm.reset()
    llm.eval(ids)
    logits = [float(x) for x in llm.scores[len(ids) - 1]]
    out = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                          reset=True):
        out.append(int(t))
        if len(out) == a.n:
            break
    json.dump({"tokens": [int(t) for t in tokens], "logits": logits, "continuation": out},
              sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
