"""The official openai SDK, with strict response validation, against a running ttrl-serve.

Usage: python openai_sdk.py BASE_URL MODEL. Exits non-zero on the first failed check.
"""
import sys

import openai
from openai import OpenAI

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"{base}/v1", api_key="unused", _strict_response_validation=True, max_retries=0)
question = [{"role": "user", "content": "What is the capital of France?"}]

# Chat, greedy.
r = client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=24)
assert "Paris" in r.choices[0].message.content, r
assert r.usage.completion_tokens == 7 or r.usage.completion_tokens > 0, r.usage
assert r.choices[0].finish_reason in ("stop", "length")
print("chat:", repr(r.choices[0].message.content))

# Completions.
c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
assert c.choices[0].text and c.usage.completion_tokens <= 8, c
print("completion:", repr(c.choices[0].text))

# Streaming with usage.
stream = client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=24,
                                        stream=True, stream_options={"include_usage": True})
pieces, usage = [], None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for ch in chunk.choices:
        if ch.delta.content:
            pieces.append(ch.delta.content)
streamed = "".join(pieces)
assert streamed == r.choices[0].message.content, (streamed, r.choices[0].message.content)
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage
print("stream: %d chunks of text, usage %s" % (len(pieces), usage))

# n = 3 under a seed: distinct choices, and the same seed gives the same three.
kw = dict(model=model, messages=[{"role": "user", "content": "Write a word."}], temperature=1.0, max_tokens=12, n=3, seed=42)
a = client.chat.completions.create(**kw)
b = client.chat.completions.create(**kw)
texts = [ch.message.content for ch in a.choices]
assert len(texts) == 3 and len(set(texts)) == 3, texts
assert texts == [ch.message.content for ch in b.choices]
print("n=3:", texts)

# Log-probs.
lp = client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
content = lp.choices[0].logprobs.content
assert len(content) == lp.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
assert all(t.logprob <= 0 for t in content) and content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob
print("logprobs: first token %r %.4f" % (content[0].token, content[0].logprob))

# Stop strings.
s = client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=24, stop=[" of"])
assert s.choices[0].finish_reason == "stop" and " of" not in s.choices[0].message.content, s
print("stop:", repr(s.choices[0].message.content))

# Errors come back as the SDK's typed exceptions.
try:
    client.chat.completions.create(model=model, messages=question, temperature=5)
    raise SystemExit("temperature=5 was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "temperature", e.body
try:
    client.chat.completions.create(model="no-such-model", messages=question)
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
print("errors: BadRequestError and NotFoundError raised")
print("all SDK checks passed")
