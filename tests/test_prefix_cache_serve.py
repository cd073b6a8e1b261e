"""Prefix cache end to end: `pdmesh serve` (real processes, the `openai` client), a repeated
prompt reports usage.prompt_tokens_details.cached_tokens > 0 and the same greedy text as
the runtime alone without a cache; colocated and 1P1D (the prefill's count travels in its
Transfer reply to the decode, which reports it once in the usage); pools small enough
that later prompts evict earlier ones' pages."""
from __future__ import annotations

import signal

import pytest

from mesh_procs import chat_when_routable, start_serve
from pdmesh import Engine, SamplingParams

SYSTEM = ("You are the help desk of a small public library. Answer briefly and politely; "
          "opening hours are nine to five on weekdays and ten to two on Saturdays.")
QUESTIONS = ["Are you open on Saturday?", "Can I renew a book online?", "Do you have a printer?"]
# fp32 (conftest) SmolLM2-135M: 30 layers x 2 x 16 tokens x 3 heads x 64 x 4 bytes a page
PAGE_BYTES = 30 * 2 * 16 * 3 * 64 * 4
MAX_TOKENS = 12


def messages(q: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]


@pytest.fixture(scope="module")
def expected(default_model):
    e = Engine(loaded=default_model, num_pages=64, prefix_cache=False, num_threads=1)
    return [e.generate(messages=messages(q), params=SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))[0] for q in QUESTIONS]


@pytest.mark.parametrize("topology", [("--colocated", "1", "--prefill", "0", "--decode", "0"),
                                      ("--prefill", "1", "--decode", "1")],
                         ids=["colocated", "1p1d"])
def test_repeated_prompt_reports_cached_tokens_and_same_text(expected, topology):
    """Pools of 5 pages (one request at a time): the prompts (54-55 tokens) share their
    first 2 pages (42 tokens); the third and fourth prompts evict the first one's pages."""
    import openai

    proc, base, lines = start_serve(*topology, f"--worker-arg=--kv-cache-bytes={5 * PAGE_BYTES}",
                                    "--worker-arg=--prefix-cache")
    try:
        client = openai.OpenAI(base_url=base, api_key="unused")

        def ask(i: int, **kw):
            return client.chat.completions.create(
                model="default", messages=messages(QUESTIONS[i]), max_tokens=MAX_TOKENS,
                temperature=0, extra_body={"ignore_eos": True}, **kw)

        def check(res, i: int) -> int:
            assert res.choices[0].message.content == expected[i].text
            assert res.usage.prompt_tokens == len(expected[i].prompt_token_ids)
            assert res.usage.completion_tokens == MAX_TOKENS
            return res.usage.prompt_tokens_details.cached_tokens

        n = len(expected[0].prompt_token_ids)
        assert check(chat_when_routable(client, model="default", messages=messages(QUESTIONS[0]),
                                        max_tokens=MAX_TOKENS, temperature=0,
                                        extra_body={"ignore_eos": True}), 0) == 0
        full = (n - 1) // 16 * 16  # page size 16: every full page but the last token's
        assert check(ask(0), 0) == full > 0
        assert check(ask(1), 1) == 32 and check(ask(2), 2) == 32  # the shared 2 pages
        assert 0 < check(ask(0), 0) < full  # its third page was evicted (LRU)
        chunks = list(ask(0, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            expected[0].text
        usage = chunks[-1].usage  # counted once: only the final chunk carries usage
        assert usage.prompt_tokens_details.cached_tokens >= 32
        assert sum(1 for c in chunks if c.usage is not None) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines)
