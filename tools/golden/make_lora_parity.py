#!/usr/bin/env python3
"""Golden files for handgrad's LoRA parity tests, produced by the real reference (PEFT).

Made with torch 2.15.0+cu132, transformers 5.25.0, peft 0.21.2, safetensors 0.8.0 (CPU, fp32).

For each case a small random base model (LlamaForCausalLM / Qwen3ForCausalLM, same configs as
the matching cases of make_model_parity.py) is wrapped with `peft.get_peft_model` (LoRA r=4,
alpha=8 on every attention and MLP projection). Both LoRA factors are then set to seeded random
nonzero values (PEFT initialises B to zero, which would make the adapter a no-op and hide
mistakes). One masked "chat" example is run forward and backward in fp32 and one safetensors file
is written to tests/golden/lora_<case>.safetensors holding:

  * every base parameter under its plain HF name (`model.layers.0.self_attn.q_proj.weight`, ...),
    float32; a tied classifier has no `lm_head.weight` entry, as in the parity goldens,
  * every adapter tensor under the exact name PEFT writes to adapter_model.safetensors
    (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, ...), float32,
  * `input_ids` (int64 [1, T]) and `labels` (int64 [1, T]): labels are input_ids with the first
    MASKED positions set to -100. HF convention: the model predicts labels[:, 1:] from positions
    [:, :-1]; the loss is the mean cross-entropy over the positions whose shifted label is not
    -100 (here T - MASKED = 7 targets: positions 4..10 predict tokens 5..11),
  * `logits` (float32 [1, T, vocab]) of the adapted model and `loss` (float64 [1]),
  * `grad.<adapter name>` (float32): d(loss)/d(adapter tensor); the base is frozen as PEFT does,
  * `merged.<HF name>` (float32): each adapted base matrix after `merge_and_unload()`,
    i.e. W + (alpha / r) * B @ A,
  * metadata `config`: the base model's config.json text (full, as in the parity goldens),
    `adapter_config`: adapter_config.json exactly as `PeftModel.save_pretrained` writes it,
    plus the library versions.

Norm gains are random (not 1) so that a wrong RMSNorm backward cannot hide. The script re-runs
itself with PYTHONHASHSEED=0 so the target_modules order in adapter_config (a set inside PEFT)
is stable; reruns give identical tensors and metadata (the safetensors header order may differ).

Usage: pip install torch transformers peft safetensors && python3 tools/golden/make_lora_parity.py
"""

import copy
import os
import sys
import tempfile

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "golden")

CASES = {
    # GQA (4 query heads over 2 kv heads), untied classifier (= parity case llama_gqa).
    "llama_gqa": (
        LlamaForCausalLM,
        LlamaConfig(
            vocab_size=61,
            hidden_size=32,
            intermediate_size=44,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
        ),
    ),
    # Qwen3: q/k norm, head_dim (10) != hidden/heads (6), GQA, theta 1e6, tied (= qwen3_hd).
    "qwen3_hd": (
        Qwen3ForCausalLM,
        Qwen3Config(
            vocab_size=71,
            hidden_size=24,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=10,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        ),
    ),
}

# The adapter every case gets; the Rust side must write an equivalent adapter_config.json.
RANK, ALPHA = 4, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SEQ = 12     # T: tokens in the single example (batch 1)
MASKED = 5   # labels[:, :MASKED] = -100 (the "prompt" part of a chat example)
LORA_STD = 0.05  # scale of the random A and B factors


def randomize_base(model, gen):
    """Random base weights; norm gains around 1 but not 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


def adapter_key(param_name, adapter="default"):
    """PEFT parameter name -> the name PEFT saves (the adapter name segment dropped)."""
    return param_name.replace(f".{adapter}.", ".")


def make_case(index, case, cls, config):
    gen = torch.Generator().manual_seed(4321 + index)
    config._attn_implementation = "eager"
    config.architectures = [cls.__name__]
    torch.manual_seed(4321 + index)  # PEFT's own init (overwritten below) draws from the global RNG
    model = cls(config).float()
    randomize_base(model, gen)
    model.eval()  # no dropout anywhere (there is none in these configs, but be explicit)

    # Snapshot the base parameters under their plain HF names before PEFT renames them.
    base = {name: p.detach().clone().contiguous() for name, p in model.named_parameters()}

    ids = torch.randint(0, config.vocab_size, (1, SEQ), generator=gen)
    labels = ids.clone()
    labels[:, :MASKED] = -100

    with torch.no_grad():
        base_logits = model(input_ids=ids).logits.clone()

    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")
    pm = get_peft_model(model, lora)

    # Known nonzero factors for every adapter tensor (iterated in a fixed order).
    adapter_params = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    assert adapter_params and all(".lora_" in n for n, _ in adapter_params), adapter_params
    with torch.no_grad():
        for _, p in adapter_params:
            p.copy_(LORA_STD * torch.randn(p.shape, generator=gen))

    out = pm(input_ids=ids, labels=labels)
    logits, loss = out.logits, out.loss

    # Cross-check HF's loss against the documented definition.
    shift_logits = logits[0, :-1]
    shift_labels = labels[0, 1:]
    keep = shift_labels != -100
    manual = torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep])
    assert keep.sum().item() == SEQ - MASKED
    assert torch.allclose(manual, loss, atol=1e-6), (manual.item(), loss.item())

    loss.backward()

    diff = (logits.detach() - base_logits).abs().max().item()
    assert diff > 1e-2, f"{case}: adapter barely changes the logits (max diff {diff})"

    tensors = {name: t for name, t in base.items()}
    saved = get_peft_model_state_dict(pm)
    grad_names = {adapter_key(n): p for n, p in adapter_params}
    assert set(saved) == set(grad_names), (sorted(saved), sorted(grad_names))
    for name, t in saved.items():
        tensors[name] = t.detach().float().contiguous()
        tensors["grad." + name] = grad_names[name].grad.detach().float().contiguous()

    tensors["input_ids"] = ids.contiguous()
    tensors["labels"] = labels.contiguous()
    tensors["logits"] = logits.detach().contiguous()
    tensors["loss"] = loss.detach().double().reshape(1)

    # Merged weights, computed on a copy so the model above stays untouched.
    merged = copy.deepcopy(pm).merge_and_unload()
    scale = ALPHA / RANK
    n_merged = 0
    for name, p in merged.named_parameters():
        module = name.rsplit(".", 2)[-2]  # "...self_attn.q_proj.weight" -> "q_proj"
        if module not in TARGETS:
            continue
        # Check the merge against W + (alpha/r) B A from the saved factors.
        prefix = "base_model.model." + name[: -len(".weight")]
        a, b = saved[prefix + ".lora_A.weight"], saved[prefix + ".lora_B.weight"]
        expect = base[name] + scale * (b @ a)
        assert torch.allclose(p, expect, atol=1e-6), name
        tensors["merged." + name] = p.detach().contiguous()
        n_merged += 1
    assert n_merged == len(TARGETS) * config.num_hidden_layers

    # adapter_config.json exactly as PEFT writes it.
    with tempfile.TemporaryDirectory(prefix="peft-golden-") as tmp:
        pm.save_pretrained(tmp)
        with open(os.path.join(tmp, "adapter_config.json")) as f:
            adapter_config = f.read()

    meta = {
        "config": config.to_json_string(use_diff=False),
        "adapter_config": adapter_config,
        "generator": "tools/golden/make_lora_parity.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    path = os.path.join(OUT, f"lora_{case}.safetensors")
    save_file(tensors, path, metadata=meta)
    print(f"{path}: loss {loss.item():.6f}, max |logit| {logits.abs().max().item():.4f}, "
          f"max |logit - base logit| {diff:.4f}, {len(saved)} adapter tensors, "
          f"{len(base)} base tensors")


def main():
    # PEFT stores target_modules as a set, so the order it writes them to adapter_config.json
    # follows Python's string hashing. Pin the hash seed (by re-running this script once) so
    # the golden files come out byte for byte the same on every run.
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = dict(os.environ, PYTHONHASHSEED="0")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    os.makedirs(OUT, exist_ok=True)
    for i, (case, (cls, config)) in enumerate(CASES.items()):
        make_case(i, case, cls, config)


if __name__ == "__main__":
    main()
