#!/usr/bin/env python3
"""Self-test of check_adapter.py from a LoRA golden file (tests/golden/lora_<case>.safetensors).

    python3 tools/peft/selftest.py tests/golden/lora_llama_gqa.safetensors WORK_DIR

Writes, under WORK_DIR (which must not exist yet):
  base/          the base model (HF save_pretrained),
  adapter/       the golden's adapter tensors and adapter_config.json text written verbatim,
                 i.e. the folder handgrad's exporter must produce,
  merged/        the base with the golden's `merged.*` matrices (HF save_pretrained),
  expect.safetensors      input_ids + the golden logits,
  expect_bad.safetensors  the same with one logit moved by 1e-3,
  adapter_bad/   the adapter with one lora_B value moved by 0.05,
then runs check_adapter.py three times: the golden run must pass, the perturbed logits and
the perturbed adapter must fail. Exit status 0 when all three behave, 1 otherwise.
"""

import json
import os
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

CHECKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "check_adapter.py")


def base_model(config, tensors):
    """A model from `config` holding the golden's plain-HF-named base parameters."""
    model = AutoModelForCausalLM.from_config(config).float()
    base = {k: v for k, v in tensors.items()
            if k.startswith(("model.", "lm_head."))}
    missing, unexpected = model.load_state_dict(base, strict=False)
    # A tied classifier has no lm_head.weight of its own; nothing else may be missing.
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert not missing or config.tie_word_embeddings
    return model.eval()


def main():
    golden, work = sys.argv[1], sys.argv[2]
    os.makedirs(work)
    tensors = load_file(golden)
    with safe_open(golden, "pt") as f:
        meta = f.metadata()
    config = AutoConfig.for_model(**json.loads(meta["config"]))

    base_model(config, tensors).save_pretrained(os.path.join(work, "base"))

    def write_adapter(folder, adapter):
        os.makedirs(folder)
        save_file(adapter, os.path.join(folder, "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            f.write(meta["adapter_config"])

    adapter = {k: v for k, v in tensors.items() if k.startswith("base_model.")}
    write_adapter(os.path.join(work, "adapter"), adapter)
    bad_adapter = dict(adapter)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    bad_adapter[key] = adapter[key].clone()
    bad_adapter[key][0, 0] += 0.05
    write_adapter(os.path.join(work, "adapter_bad"), bad_adapter)

    merged = base_model(config, tensors)
    with torch.no_grad():
        params = dict(merged.named_parameters())
        for k, v in tensors.items():
            if k.startswith("merged."):
                params[k[len("merged."):]].copy_(v)
    merged.save_pretrained(os.path.join(work, "merged"))

    ids, logits = tensors["input_ids"], tensors["logits"]
    save_file({"input_ids": ids, "logits": logits}, os.path.join(work, "expect.safetensors"))
    bad = logits.clone()
    bad[0, -1, 0] += 1e-3
    save_file({"input_ids": ids, "logits": bad}, os.path.join(work, "expect_bad.safetensors"))

    def run(adapter, expect):
        cmd = [sys.executable, CHECKER, "--base", os.path.join(work, "base"),
               "--adapter", os.path.join(work, adapter), "--expect", os.path.join(work, expect),
               "--merged", os.path.join(work, "merged")]
        return subprocess.run(cmd).returncode

    good = run("adapter", "expect.safetensors")
    bad_logits = run("adapter", "expect_bad.safetensors")
    bad_adapter = run("adapter_bad", "expect.safetensors")
    ok = (good, bad_logits, bad_adapter) == (0, 1, 1)
    print(f"selftest: golden rc={good} (want 0), perturbed logits rc={bad_logits} (want 1), "
          f"perturbed adapter rc={bad_adapter} (want 1): {'ok' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
