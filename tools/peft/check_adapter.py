#!/usr/bin/env python3
"""Check a LoRA adapter written by handgrad against the reference: Hugging Face PEFT.

    python3 tools/peft/check_adapter.py --base BASE_HF_DIR --adapter ADAPTER_DIR \
        --expect EXPECT.safetensors [--merged MERGED_HF_DIR] [--tol 1e-4]

  * BASE_HF_DIR: the base model as a Hugging Face folder (config.json + model.safetensors).
  * ADAPTER_DIR: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
  * EXPECT: a safetensors file holding `input_ids` (int64 [B, T]) and `logits`
    (float32 [B, T, V]): what the caller computed for the base + adapter model.
  * MERGED_HF_DIR (optional): a plain HF model folder holding the merged weights
    W + (alpha/r) B A; its logits must equal PEFT's too.

The base is loaded in fp32, the adapter applied with `PeftModel.from_pretrained`, and the
logits compared by max absolute difference. Exit status: 0 all checks pass, 1 a check
failed (or a folder could not be loaded), 2 torch / transformers / peft / safetensors missing.
"""

import argparse
import os
import sys
import warnings

# Local folders only (never wait on the Hub, e.g. in CI without internet), and quiet output.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter

try:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
except ImportError as e:  # keep this message short: callers show it when skipping
    print(f"check_adapter: missing Python package ({e}); "
          "install with: pip install torch transformers peft safetensors", file=sys.stderr)
    sys.exit(2)


def load_fp32(folder):
    """A plain HF causal LM from `folder`, in fp32, eval mode, eager attention."""
    kwargs = {"attn_implementation": "eager"}
    try:  # transformers >= 4.56 calls it `dtype`; older versions only know `torch_dtype`
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, **kwargs)
    return model.float().eval()


def compare(label, got, want, tol):
    """Print the max abs difference of two logit tensors; return True when within tol."""
    if got.shape != want.shape:
        print(f"{label}: FAIL shape {tuple(got.shape)} != expected {tuple(want.shape)}")
        return False
    diff = (got.double() - want.double()).abs().max().item()
    ok = diff <= tol
    print(f"{label}: max |diff| {diff:.3e} (tol {tol:.1e}) {'ok' if ok else 'FAIL'}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="base model HF folder")
    ap.add_argument("--adapter", required=True, help="PEFT adapter folder")
    ap.add_argument("--expect", required=True,
                    help="safetensors with input_ids int64 [B,T] and logits float32 [B,T,V]")
    ap.add_argument("--merged", help="merged model HF folder to check as well")
    ap.add_argument("--tol", type=float, default=1e-4, help="max abs logit difference")
    args = ap.parse_args()

    expect = load_file(args.expect)
    for key in ("input_ids", "logits"):
        if key not in expect:
            print(f"check_adapter: {args.expect} has no `{key}` tensor", file=sys.stderr)
            return 1
    ids = expect["input_ids"].long()
    want = expect["logits"].float()

    try:
        base = load_fp32(args.base)
        model = PeftModel.from_pretrained(base, args.adapter).eval()
    except Exception as e:  # a malformed folder is a failed check, not a crash
        print(f"check_adapter: FAIL loading base {args.base} + adapter {args.adapter}: "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1

    with torch.no_grad():
        peft_logits = model(input_ids=ids).logits.float()
    ok = compare("adapter vs PEFT", want, peft_logits, args.tol)

    if args.merged:
        try:
            merged = load_fp32(args.merged)
        except Exception as e:
            print(f"check_adapter: FAIL loading merged model {args.merged}: "
                  f"{type(e).__name__}: {e}", file=sys.stderr)
            return 1
        with torch.no_grad():
            merged_logits = merged(input_ids=ids).logits.float()
        ok = compare("merged vs PEFT", merged_logits, peft_logits, args.tol) and ok

    if not ok:
        print("check_adapter: FAIL", file=sys.stderr)
        return 1
    print("check_adapter: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
