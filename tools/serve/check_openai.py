#!/usr/bin/env python3
"""The official `openai` Python client against a running `handgrad serve` (used by
tests/serve.rs; also by hand: `python3 tools/serve/check_openai.py --base-url
http://127.0.0.1:8080/v1 --model NAME`, with OPENAI_API_KEY set when the server has a key).

Checks completions and chat, streamed and not (the same text at temperature 0), eight
concurrent streaming clients, and the errors the client raises for an unknown model, a
prompt over the context and a wrong API key. Prints one JSON line at the end: the prompt and
the greedy completion (the test compares it with `handgrad generate`).
"""

import argparse
import json
import os
import sys
import threading

import openai


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.base_url, api_key=os.environ.get("OPENAI_API_KEY", "none"))

    models = [m.id for m in client.models.list()]
    assert models == [a.model], models

    prompt = "Once upon a time, a small bird"
    r = client.completions.create(model=a.model, prompt=prompt, max_tokens=20, temperature=0)
    text = r.choices[0].text
    n, finish = r.usage.completion_tokens, r.choices[0].finish_reason
    assert (n == 20 and finish == "length") or (n < 20 and finish == "stop"), r
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=a.model, prompt=prompt, max_tokens=20, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == text, (streamed, text)

    messages = [{"role": "user", "content": "Tell me a story about a frog."}]
    c = client.chat.completions.create(model=a.model, messages=messages, max_tokens=16, temperature=0)
    reply = c.choices[0].message.content
    assert c.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model=a.model, messages=messages, max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    sreply = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert sreply == reply, (sreply, reply)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == c.usage.completion_tokens

    # Eight streaming clients at once.
    results = [None] * 8

    def one(i: int) -> None:
        parts = []
        finish = None
        for ch in client.completions.create(
            model=a.model, prompt=f"Story {i}:", max_tokens=24, temperature=0.7, seed=i, stream=True
        ):
            if ch.choices:
                parts.append(ch.choices[0].text)
                finish = ch.choices[0].finish_reason or finish
        results[i] = finish

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(f in ("stop", "length") for f in results), results

    # Errors.
    try:
        client.completions.create(model="no-such-model", prompt="Hi", max_tokens=2)
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404
    try:
        client.completions.create(model=a.model, prompt="word " * 5000, max_tokens=2)
        raise AssertionError("a prompt over the context was accepted")
    except openai.BadRequestError as e:
        assert e.code == "context_length_exceeded", e.code
    wrong = openai.OpenAI(base_url=a.base_url, api_key="sk-wrong", max_retries=0)
    try:
        wrong.completions.create(model=a.model, prompt="Hi", max_tokens=2)
        raise AssertionError("a wrong API key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401

    print(json.dumps({"prompt": prompt, "completion": text}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
