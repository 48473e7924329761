#!/usr/bin/env python3
"""Golden files for handgrad's chat templates (tests/chat_template.rs).

Renders conversations with the real chat templates of three model families through
`transformers`' `apply_chat_template` (Jinja2, the reference implementation) and writes
tests/golden/chat/templates.json:

  templates[name]   the template file (tests/golden/chat/<file>), its bos/eos strings, the
                    special tokens added to the tokenizer for it (content and id), and the
                    end-of-turn marker a person reads off the template
  cases[]           template, messages, the JSONL line holding them (key order kept),
                    add_generation_prompt, optional enable_thinking/tools,
                    and what transformers gives: the text (tokenize=False), or the error a
                    template raises; the ids (tokenize=True) with the tokenizer below; and
                    `train`, the assistant-token mask by handgrad's documented rule
                    (docs/chat-data.md) computed here independently: Jinja2 prefix renderings,
                    the marker, and the tokenizer's own offsets (return_offsets_mapping)
  now_unix          the time strftime_now saw (the Llama template prints today's date)

Tokenizer: tests fixture qwen/tokenizer.json (Qwen3's vocabulary and added tokens). For the
Llama 3.2 and Gemma 2 templates, whose special tokens Qwen's vocabulary lacks, those tokens are
added to it as special added tokens (ids 151669, ...), as `tokenizer.add_special_tokens` does;
the ids then test that the rendered special tokens become single ids and that the rest of the
text is tokenized as one piece.

Usage:
  pip install transformers tokenizers jinja2
  python3 tools/golden/make_chat_templates.py [TEMPLATES_DIR] [FIXTURES_DIR]
TEMPLATES_DIR holds the .jinja files (default tests/golden/chat); FIXTURES_DIR defaults to
../shared/fixtures.
"""

import json
import os
import shutil
import sys
import time

from tokenizers import AddedToken, Tokenizer
from transformers import PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "golden", "chat")
TEMPLATES = sys.argv[1] if len(sys.argv) > 1 else OUT
FIXTURES = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "..", "shared", "fixtures")

FAMILIES = {
    "qwen3": {
        "file": "Qwen-Qwen3-0.6B.jinja",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "added": [],
        "end_of_turn": "<|im_end|>",
    },
    "llama3.2": {
        "file": "meta-llama-Llama-3.2-3B-Instruct.jinja",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "added": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "end_of_turn": "<|eot_id|>",
    },
    "gemma2": {
        "file": "google-gemma-2-2b-it.jinja",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "added": ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        "end_of_turn": "<end_of_turn>",
    },
}


def msg(role, content, **extra):
    return dict(role=role, content=content, **extra)


SYSTEM = msg("system", "You are a concise assistant.")
CONVERSATIONS = {
    "single": [msg("user", "What is 2 + 2?"), msg("assistant", "4.")],
    "system_single": [SYSTEM, msg("user", "Name a colour."), msg("assistant", "Blue.")],
    "multi_turn": [
        SYSTEM,
        msg("user", "Hello!"),
        msg("assistant", "<think>\nA greeting.\n</think>\n\nHi! How can I help?"),
        msg("user", "Tell me a  fact about  cats.\n"),
        msg("assistant", "  Cats sleep about 15 hours a day.\n\nThey also purr. "),
    ],
    "unicode": [
        msg("user", "Übersetze: «bonjour» 👋"),
        msg("assistant", "Hallo – 你好!\n\n```py\nprint('hi')\n```"),
    ],
    "prompt_only": [SYSTEM, msg("user", "Write a haiku.")],
    # The prompt/completion line {"prompt": "...", "completion": "..."} as handgrad reads it.
    "prompt_completion": [msg("user", "Capital of France?"), msg("assistant", "Paris.")],
    "user_only": [msg("user", "Write a haiku.")],
}

# (family, conversation, add_generation_prompt, extra kwargs); the first mask-bearing ones are
# those ending with an assistant message and add_generation_prompt False.
CASES = [
    ("qwen3", "single", False, {}),
    ("qwen3", "system_single", False, {}),
    ("qwen3", "multi_turn", False, {}),
    ("qwen3", "unicode", False, {}),
    ("qwen3", "prompt_completion", False, {}),
    ("qwen3", "prompt_only", True, {}),
    ("qwen3", "prompt_only", True, {"enable_thinking": False}),
    ("qwen3", "multi_turn", True, {}),
    (
        "qwen3",
        "single",
        False,
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "get_time",
                        "description": "Current time in a city",
                        "parameters": {
                            "type": "object",
                            "properties": {"city": {"type": "string"}},
                            "required": ["city"],
                        },
                    },
                }
            ]
        },
    ),
    ("llama3.2", "single", False, {}),
    ("llama3.2", "system_single", False, {}),
    ("llama3.2", "multi_turn", False, {}),
    ("llama3.2", "prompt_only", True, {}),
    ("llama3.2", "prompt_completion", False, {}),
    ("gemma2", "single", False, {}),
    ("gemma2", "unicode", False, {}),
    ("gemma2", "prompt_completion", False, {}),
    ("gemma2", "user_only", True, {}),
    # Gemma refuses a system message: its raise_exception message must come through.
    ("gemma2", "system_single", False, {}),
]


def tokenizer_for(family):
    f = FAMILIES[family]
    t = Tokenizer.from_file(os.path.join(FIXTURES, "qwen", "tokenizer.json"))
    if f["added"]:
        t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in f["added"]])
    kw = {k: f[k] for k in ("bos_token", "eos_token") if f[k] is not None}
    tok = PreTrainedTokenizerFast(tokenizer_object=t, **kw)
    with open(os.path.join(TEMPLATES, f["file"]), encoding="utf-8") as fh:
        tok.chat_template = fh.read()
    return tok, [(s, t.token_to_id(s)) for s in f["added"]]


def render(tok, messages, gen, kw):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kw)


def mask(tok, family, messages, kw, text):
    """handgrad's rule, independently: assistant i trains [len(prefix_i), end of the first
    end-of-turn marker after it); a token is trained when its offsets overlap."""
    marker = FAMILIES[family]["end_of_turn"]
    ranges = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(tok, messages[:i], True, kw)
        assert text.startswith(prefix), (family, i)
        s = len(prefix.encode("utf-8"))
        rest = text.encode("utf-8")[s:]
        p = rest.find(marker.encode("utf-8"))
        e = s + p + len(marker.encode("utf-8")) if p >= 0 else len(text.encode("utf-8"))
        ranges.append((s, e))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    # Offsets are in characters; handgrad's are bytes: convert.
    byte_at = [0]
    for ch in text:
        byte_at.append(byte_at[-1] + len(ch.encode("utf-8")))
    train = []
    for a, b in enc["offset_mapping"]:
        a, b = byte_at[a], byte_at[b]
        b = max(b, a + 1)
        train.append(int(any(a < e and b > s for s, e in ranges)))
    return train


def main():
    os.makedirs(OUT, exist_ok=True)
    now = int(time.time())
    day = time.strftime("%d %b %Y")
    out = {"now_unix": now, "templates": {}, "cases": []}
    toks = {}
    for fam, f in FAMILIES.items():
        src = os.path.join(TEMPLATES, f["file"])
        if os.path.abspath(TEMPLATES) != os.path.abspath(OUT):
            shutil.copyfile(src, os.path.join(OUT, f["file"]))
        toks[fam], added = tokenizer_for(fam)
        out["templates"][fam] = {
            "file": f["file"],
            "bos_token": f["bos_token"],
            "eos_token": f["eos_token"],
            "added_tokens": [{"content": s, "id": i} for s, i in added],
            "end_of_turn": f["end_of_turn"],
        }
    for fam, conv, gen, kw in CASES:
        tok = toks[fam]
        messages = CONVERSATIONS[conv]
        case = {"template": fam, "conversation": conv, "messages": messages,
                "add_generation_prompt": gen}
        case.update(kw)
        # The JSONL line a user would write for it (handgrad reads the case through it).
        if conv == "prompt_completion":
            line = {"prompt": messages[0]["content"], "completion": messages[1]["content"]}
        else:
            line = {"messages": messages}
        if "tools" in kw:
            line["tools"] = kw["tools"]
        case["line"] = json.dumps(line, ensure_ascii=False)
        try:
            text = render(tok, messages, gen, kw)
        except Exception as e:  # a template's raise_exception
            case["error"] = str(e)
            out["cases"].append(case)
            continue
        case["text"] = text
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen,
                                      return_dict=True, **kw)["input_ids"]
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        case["ids"] = ids
        if not gen and messages[-1]["role"] == "assistant":
            case["train"] = mask(tok, fam, messages, kw, text)
        out["cases"].append(case)
    assert any("error" in c for c in out["cases"]), "expected gemma2 to refuse a system message"
    assert time.strftime("%d %b %Y") == day, "the date changed while rendering; run again"
    with open(os.path.join(OUT, "templates.json"), "w", encoding="utf-8") as fh:
        json.dump(out, fh, ensure_ascii=False, indent=1)
        fh.write("\n")
    print(f"wrote {len(out['cases'])} cases to {os.path.join(OUT, 'templates.json')}")


if __name__ == "__main__":
    main()
