#!/usr/bin/env python3
"""Golden files for handgrad's model parity tests, produced by the real reference.

Builds small random LlamaForCausalLM / Qwen3ForCausalLM models with Hugging Face transformers,
runs a forward and backward pass in fp32 on random token ids and writes, per case, one
safetensors file to tests/golden/parity_<case>.safetensors holding:

  * every parameter under its HF name,
  * `input_ids` (int64, [batch, seq + 1]): the model reads [:, :seq] and predicts [:, 1:],
  * `logits` (float32, [batch, seq, vocab]) and `loss` (float64 scalar as [1]): mean
    cross-entropy of the logits against the next tokens,
  * `grad.<name>` (float32): d(loss)/d(parameter) for every parameter,
  * metadata `config`: the model's config.json text (as transformers writes it).

Norm gains are random (not 1) so that a wrong RMSNorm backward cannot hide.

Usage: pip install torch transformers safetensors && python3 tools/golden/make_model_parity.py
"""

import json
import os

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "golden")

CASES = {
    # GQA (4 query heads over 2 kv heads), untied classifier.
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
    # Plain multi-head attention, tied embeddings.
    "llama_tied": (
        LlamaForCausalLM,
        LlamaConfig(
            vocab_size=50,
            hidden_size=24,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=3,
            max_position_embeddings=64,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=True,
        ),
    ),
    # Qwen3: q/k norm, head_dim (10) != hidden/heads (6), GQA, theta 1e6, tied.
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

BATCH, SEQ = 2, 9


def randomize(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


def main():
    os.makedirs(OUT, exist_ok=True)
    for i, (case, (cls, config)) in enumerate(CASES.items()):
        gen = torch.Generator().manual_seed(1234 + i)
        config._attn_implementation = "eager"
        config.architectures = [cls.__name__]
        model = cls(config).float()
        randomize(model, gen)
        ids = torch.randint(0, config.vocab_size, (BATCH, SEQ + 1), generator=gen)
        logits = model(input_ids=ids[:, :SEQ]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1)
        )
        loss.backward()
        tensors = {"input_ids": ids.contiguous(), "logits": logits.detach().contiguous(),
                   "loss": loss.detach().double().reshape(1)}
        for name, p in model.named_parameters():
            tensors[name] = p.detach().contiguous()
            tensors["grad." + name] = p.grad.detach().contiguous()
        meta = {"config": config.to_json_string(use_diff=False),
                "generator": "tools/golden/make_model_parity.py",
                "torch": torch.__version__}
        import transformers
        meta["transformers"] = transformers.__version__
        path = os.path.join(OUT, f"parity_{case}.safetensors")
        save_file(tensors, path, metadata=meta)
        print(f"{path}: loss {loss.item():.6f}, {sum(p.numel() for p in model.parameters())} params")


if __name__ == "__main__":
    main()
