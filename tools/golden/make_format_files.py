#!/usr/bin/env python3
"""Golden files for handgrad's format tests (Hugging Face folders, llama2.c .bin, GGUF).

For the small random models of make_model_parity.py (same configs and seeds), writes to
tests/golden/formats/:

  hf_<case>/                 save_pretrained() folder: config.json + model.safetensors (f32)
  hf_qwen3_hd_bf16/          the Qwen3 case saved in bfloat16
  reference_<case>.safetensors
      input_ids [1, 7] and the logits transformers computes for them with
      logits       the f32 weights
      logits_f16   every 2-D tensor rounded to float16 (what the GGUF file holds)
      logits_bf16  every tensor rounded to bfloat16 (the bf16 folder)
      logits_q80   (llama_tied) llama2.c's Q8_0 quantisation of version 2 files
  llama2c_<case>.bin         llama2.c legacy (v0) files laid out as llama2.c's export.py
                             legacy_export writes them; q/k rows permuted back from the
                             Hugging Face rotate-half order to llama2.c's interleaved order
  llama2c_v1_llama_tied.bin  version 1 (magic ak42) layout of version1_export
  llama2c_v2_llama_tied.bin  version 2 (Q8_0, group size backed off as export.py does)
  <case>.gguf                GGUF v3 via the `gguf` package, llama.cpp tensor names, F16
                             matrices / F32 norms; Llama q/k permuted to llama.cpp's order

Usage: pip install torch transformers safetensors gguf && python3 tools/golden/make_format_files.py
"""

import os
import struct
import sys

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_model_parity import CASES, randomize  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "golden", "formats")
IDS = [[3, 17, 9, 1, 40, 22, 5]]


def build(case, i):
    cls, config = CASES[case]
    gen = torch.Generator().manual_seed(1234 + i)
    config._attn_implementation = "eager"
    config.architectures = [cls.__name__]
    model = cls(config).float()
    randomize(model, gen)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


@torch.no_grad()
def logits_with(model, transform):
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.copy_(transform(n, p))
    out = model(input_ids=torch.tensor(IDS)).logits.detach().contiguous()
    for n, p in model.named_parameters():
        p.copy_(saved[n])
    return out


def to_meta_order(w, n_heads):
    """Inverse of the Hugging Face converter's permute: rotate-half rows -> interleaved rows."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def f32(f, t):
    f.write(t.detach().float().contiguous().numpy().astype("<f4").tobytes())


def llama2c_params(model):
    c = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    n_kv = c.num_key_value_heads
    layers = range(c.num_hidden_layers)
    L = lambda name: [sd[f"model.layers.{i}.{name}"] for i in layers]  # noqa: E731
    return {
        "emb": sd["model.embed_tokens.weight"],
        "att_norm": L("input_layernorm.weight"),
        "wq": [to_meta_order(w, c.num_attention_heads) for w in L("self_attn.q_proj.weight")],
        "wk": [to_meta_order(w, n_kv) for w in L("self_attn.k_proj.weight")],
        "wv": L("self_attn.v_proj.weight"),
        "wo": L("self_attn.o_proj.weight"),
        "ffn_norm": L("post_attention_layernorm.weight"),
        "w1": L("mlp.gate_proj.weight"),
        "w2": L("mlp.down_proj.weight"),
        "w3": L("mlp.up_proj.weight"),
        "norm": sd["model.norm.weight"],
        "out": sd["lm_head.weight"],
    }


def header7(c, vocab):
    return struct.pack("iiiiiii", c.hidden_size, c.intermediate_size, c.num_hidden_layers,
                       c.num_attention_heads, c.num_key_value_heads, vocab, c.max_position_embeddings)


def write_llama2c_legacy(model, path):
    c = model.config
    p = llama2c_params(model)
    shared = c.tie_word_embeddings
    head = c.hidden_size // c.num_attention_heads
    with open(path, "wb") as f:
        f.write(header7(c, c.vocab_size if shared else -c.vocab_size))
        f32(f, p["emb"])
        for k in ["att_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3"]:
            for w in p[k]:
                f32(f, w)
        f32(f, p["norm"])
        freqs = 1.0 / (c.rope_parameters["rope_theta"] ** (torch.arange(0, head, 2).float() / head))
        angles = torch.outer(torch.arange(c.max_position_embeddings).float(), freqs)
        f32(f, torch.cos(angles))
        f32(f, torch.sin(angles))
        if not shared:
            f32(f, p["out"])


def write_llama2c_v1(model, path):
    c = model.config
    p = llama2c_params(model)
    shared = c.tie_word_embeddings
    with open(path, "wb") as f:
        f.write(struct.pack("I", 0x616B3432))
        f.write(struct.pack("i", 1))
        f.write(header7(c, c.vocab_size))
        f.write(struct.pack("B", int(shared)))
        f.write(b"\0" * (256 - f.tell()))
        for w in [*p["att_norm"], *p["ffn_norm"], p["norm"], p["emb"], *p["wq"], *p["wk"], *p["wv"],
                  *p["wo"], *p["w1"], *p["w2"], *p["w3"]]:
            f32(f, w)
        if not shared:
            f32(f, p["out"])


def quantize_q80(w, group):
    w = w.float().reshape(-1, group)
    scale = w.abs().max(dim=1).values / 127.0
    q = torch.round(w / scale[:, None]).to(torch.int8)
    return q, scale


def write_llama2c_v2(model, path):
    c = model.config
    p = llama2c_params(model)
    shared = c.tie_word_embeddings
    group = 64
    while c.hidden_size % group != 0:
        group //= 2
    weights = [p["emb"], *p["wq"], *p["wk"], *p["wv"], *p["wo"], *p["w1"], *p["w2"], *p["w3"]]
    if not shared:
        weights.append(p["out"])
    deq = []
    with open(path, "wb") as f:
        f.write(struct.pack("I", 0x616B3432))
        f.write(struct.pack("i", 2))
        f.write(header7(c, c.vocab_size))
        f.write(struct.pack("B", int(shared)))
        f.write(struct.pack("i", group))
        f.write(b"\0" * (256 - f.tell()))
        for w in [*p["att_norm"], *p["ffn_norm"], p["norm"]]:
            f32(f, w)
        # Each matrix as llama2.c's runq.c maps it: its int8 values, then its scales.
        for w in weights:
            q, s = quantize_q80(w, group)
            f.write(q.numpy().astype(np.int8).tobytes())
            f32(f, s)
            deq.append((q.float() * s[:, None]).reshape(w.shape))
    return group


def q80_transform(model, group):
    c = model.config

    def t(name, p):
        if p.dim() != 2:
            return p
        rows = p.shape[0]
        w = p
        permuted = None
        if "q_proj" in name:
            permuted = c.num_attention_heads
        elif "k_proj" in name:
            permuted = c.num_key_value_heads
        if permuted:
            w = to_meta_order(p, permuted)
        q, s = quantize_q80(w, group)
        d = (q.float() * s[:, None]).reshape(w.shape)
        if permuted:
            # back to rotate-half order for transformers
            d = d.reshape(permuted, rows // permuted // 2, 2, -1).transpose(1, 2).reshape(w.shape)
        return d

    return t


def write_gguf(model, path):
    import gguf
    c = model.config
    arch = "llama" if c.model_type == "llama" else "qwen3"
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
    }
    for name, t in model.state_dict().items():
        t = t.detach().float()
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            out = "output.weight"
        else:
            parts = name.split(".")
            layer, rest = parts[2], ".".join(parts[3:-1])
            out = f"blk.{layer}.{names[rest]}.weight"
            if arch == "llama" and rest == "self_attn.q_proj":
                t = to_meta_order(t, c.num_attention_heads)
            if arch == "llama" and rest == "self_attn.k_proj":
                t = to_meta_order(t, c.num_key_value_heads)
        data = t.numpy().astype(np.float16 if t.dim() == 2 else np.float32)
        w.add_tensor(out, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    os.makedirs(OUT, exist_ok=True)
    names = list(CASES)
    for case in ["llama_gqa", "llama_tied", "qwen3_hd"]:
        i = names.index(case)
        model = build(case, i)
        folder = os.path.join(OUT, f"hf_{case}")
        model.save_pretrained(folder, safe_serialization=True)
        for extra in ["generation_config.json"]:
            p = os.path.join(folder, extra)
            if os.path.exists(p):
                os.remove(p)
        ref = {
            "input_ids": torch.tensor(IDS),
            "logits": logits_with(model, lambda n, p: p),
            "logits_f16": logits_with(model, lambda n, p: p.half().float() if p.dim() == 2 else p),
            "logits_bf16": logits_with(model, lambda n, p: p.bfloat16().float()),
        }
        if case.startswith("llama"):
            write_llama2c_legacy(model, os.path.join(OUT, f"llama2c_{case}.bin"))
        if case == "llama_tied":
            write_llama2c_v1(model, os.path.join(OUT, f"llama2c_v1_{case}.bin"))
            group = write_llama2c_v2(model, os.path.join(OUT, f"llama2c_v2_{case}.bin"))
            ref["logits_q80"] = logits_with(model, q80_transform(model, group))
        if case in ("llama_gqa", "qwen3_hd"):
            write_gguf(model, os.path.join(OUT, f"{case}.gguf"))
        if case == "qwen3_hd":
            bf = os.path.join(OUT, "hf_qwen3_hd_bf16")
            model.to(torch.bfloat16).save_pretrained(bf, safe_serialization=True)
            gc = os.path.join(bf, "generation_config.json")
            if os.path.exists(gc):
                os.remove(gc)
        save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(OUT, f"reference_{case}.safetensors"))
        print(f"{case}: written")


if __name__ == "__main__":
    main()
