"""`pdmesh serve` end to end: real processes, Mooncake over tcp, the `openai` client."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from mesh_procs import SERVE_TOKEN, chat_when_routable, start_serve, worker_addresses, worker_env
from pdmesh import Engine, SamplingParams, auth
from pdmesh.v1 import decode_pb2 as dpb
from pdmesh.v1 import decode_pb2_grpc as dgrpc
from pdmesh.v1 import prefill_pb2 as ppb
from pdmesh.v1 import prefill_pb2_grpc as pgrpc

QUESTION = "What is the capital of France?"


def served_counts(lines: list[str]) -> tuple[list[int], list[int]]:
    """Per prefill: rooms whose KV it transferred; per decode: streams it finished."""
    pre = [pgrpc.PrefillStub(auth.insecure_channel(a, token=SERVE_TOKEN)).Stats(
        ppb.PrefillStatsRequest(), timeout=10).transferred_requests
        for a in worker_addresses(lines, "prefill")]
    dec = [dgrpc.DecodeStub(auth.insecure_channel(a, token=SERVE_TOKEN)).Stats(
        dpb.StatsRequest(), timeout=10).finished_requests
        for a in worker_addresses(lines, "decode")]
    return pre, dec


@pytest.fixture(scope="module")
def expected(default_model):
    out = Engine(loaded=default_model, num_pages=64).generate(
        messages=[{"role": "user", "content": QUESTION}],
        params=SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    return out


@pytest.fixture(scope="module")
def completion(default_model):
    return Engine(loaded=default_model, num_pages=64).generate(
        "The three primary colours are", SamplingParams(max_tokens=12, temperature=0))[0]


def check_completions(client, want) -> None:
    """/v1/completions through real workers, streaming and not: text and usage."""
    kw = dict(model="default", prompt="The three primary colours are", max_tokens=12,
              temperature=0)
    res = client.completions.create(**kw)
    assert res.choices[0].text == want.text
    assert res.choices[0].finish_reason == want.finish_reason
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (
        len(want.prompt_token_ids), len(want.token_ids))
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    check_replacement_characters_stream(client)


def check_replacement_characters_stream(client) -> None:
    """A model writing U+FFFD (a token of its own) streams it as it comes: a window
    detokenizer held such text until a token after it was not one, at worst to the end
    (one H200 request's first text came with its last token)."""
    kw = dict(model="default", prompt="Broken text: \ufffd\ufffd\ufffd \ufffd\ufffd\ufffd "
              "\ufffd\ufffd\ufffd", max_tokens=8, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    assert whole.count("\ufffd") >= 3, repr(whole)  # SmolLM2 greedy: " \ufffd\ufffd\ufffd \ufffd\ufffd\ufffd"
    texts = [c.choices[0].text for c in client.completions.create(stream=True, **kw)
             if c.choices]
    assert "".join(texts) == whole
    assert any(t.endswith("\ufffd") for t in texts[:-1]), texts


# (1, 1) takes the path chosen by measurement (shared memory on one host); (2, 2) is
# forced onto the transfer engine (Mooncake tcp, async writes)
@pytest.mark.parametrize("prefill, decode, kv_path", [(1, 1, "auto"), (2, 2, "mooncake")])
def test_serve_greedy_chat_equals_runtime_alone(expected, completion, prefill, decode, kv_path):
    import openai

    proc, base, lines = start_serve("--prefill", str(prefill), "--decode", str(decode),
                                    "--worker-arg=--kv-cache-bytes=50000000",
                                    f"--worker-arg=--kv-path={kv_path}")
    try:
        client = openai.OpenAI(base_url=base, api_key="unused")
        kw = dict(model="default", messages=[{"role": "user", "content": QUESTION}],
                  max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
        for _ in range(2 * prefill):  # round robin: every pair takes a request
            res = chat_when_routable(client, **kw)
            assert res.choices[0].message.content == expected.text
            assert res.usage.completion_tokens == 16
            assert res.usage.prompt_tokens == len(expected.prompt_token_ids)
        stream = client.chat.completions.create(stream=True, **kw)
        assert "".join(c.choices[0].delta.content or "" for c in stream
                       if c.choices) == expected.text
        # every worker took traffic: each request was one KV transfer and one decode stream
        pre, dec = served_counts(lines)
        assert (len(pre), len(dec)) == (prefill, decode)
        assert all(n >= 1 for n in pre + dec), (pre, dec)
        assert sum(pre) == sum(dec) == 2 * prefill + 1, (pre, dec)
        if prefill == 1:
            check_completions(client, completion)
        chosen = {m for line in lines for m in re.findall(r"KV path to \S+: (\w+)", line)}
        assert chosen == {"shm" if kv_path == "auto" else "mooncake"}, chosen
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines)
