"""Prefix cache end to end: `pdmesh serve` (real processes, the `openai` client), a repeated
prompt reports usage.prompt_tokens_details.cached_tokens > 0 and the same greedy text as
the runtime alone without a cache; colocated and 1P1D (the prefill's count travels in its
Transfer reply to the decode, which reports it once in the usage)."""
from __future__ import annotations

import signal

import pytest

from mesh_procs import chat_when_routable, start_serve
from pdmesh import Engine, SamplingParams

SYSTEM = ("You are the help desk of a small public library. Answer briefly and politely; "
          "opening hours are nine to five on weekdays and ten to two on Saturdays.")
MESSAGES = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Are you open on Saturday?"}]


@pytest.fixture(scope="module")
def expected(default_model):
    return Engine(loaded=default_model, num_pages=64, prefix_cache=False).generate(
        messages=MESSAGES, params=SamplingParams(max_tokens=12, temperature=0,
                                                 ignore_eos=True))[0]


@pytest.mark.parametrize("topology", [("--colocated", "1", "--prefill", "0", "--decode", "0"),
                                      ("--prefill", "1", "--decode", "1")],
                         ids=["colocated", "1p1d"])
def test_repeated_prompt_reports_cached_tokens_and_same_text(expected, topology):
    import openai

    proc, base, lines = start_serve(*topology, "--worker-arg=--kv-cache-bytes=50000000",
                                    "--worker-arg=--prefix-cache")
    try:
        client = openai.OpenAI(base_url=base, api_key="unused")
        kw = dict(model="default", messages=MESSAGES, max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
        n = len(expected.prompt_token_ids)
        first = chat_when_routable(client, **kw)
        again = client.chat.completions.create(**kw)
        for res in (first, again):
            assert res.choices[0].message.content == expected.text
            assert res.usage.prompt_tokens == n and res.usage.completion_tokens == 12
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        # page size 16: every full page but the last token's
        assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16 > 0
        chunks = list(client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kw))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            expected.text
        usage = chunks[-1].usage  # counted once: only the final chunk carries usage
        assert usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16
        assert sum(1 for c in chunks if c.usage is not None) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines)
