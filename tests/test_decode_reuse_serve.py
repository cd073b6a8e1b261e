"""Decode-side reuse end to end (issue 12 item 2): `pdmesh serve --prefill 1 --decode 1`,
the real `openai` client. Turn 2 of a conversation (turn 1's messages + the assistant's
reply + a new user message) finds turn 1's prompt *and reply* in the decode's prefix
cache: the prefill writes only the pages after them (its `pdmesh_kv_transfer_bytes_total`
grows by exactly those pages' bytes, and its `kv.transfer` span says so), `cached_tokens`
is the decode's cached prefix (the
longer of the two sides' prefixes: each token once), the greedy text equals the runtime
alone without any cache, and every page is back (free or evictable) afterwards."""
from __future__ import annotations

import os
import signal

import pytest

from mesh_procs import metrics_urls, start_serve, wait_until, when_routable
from pdmesh import Engine, SamplingParams
from pdmesh.telemetry.otlp_file import read_spans
from test_n_choices_serve import pages_back, scrape

PAGE = 16
# fp32 (conftest) SmolLM2-135M: 30 layers x 2 x 16 tokens x 3 heads x 64 x 4 bytes a page
PAGE_BYTES = 30 * 2 * PAGE * 3 * 64 * 4
MAX_TOKENS = 24
SYSTEM = ("You are a travel agent for trips along the coast. Answer in two short sentences "
          "and suggest one place to visit.")
TURN1 = [{"role": "system", "content": SYSTEM},
         {"role": "user", "content": "Where should I go for a quiet weekend by the sea?"}]
GREEDY = dict(max_tokens=MAX_TOKENS, temperature=0)


def turn2(reply: str) -> list[dict]:
    return TURN1 + [{"role": "assistant", "content": reply},
                    {"role": "user", "content": "And what should I eat there?"}]


@pytest.fixture(scope="module")
def runtime(default_model):
    """The runtime alone, no cache (no reuse anywhere): (engine, turn 1, turn 2 outputs)."""
    e = Engine(loaded=default_model, num_pages=64, prefix_cache=False, num_threads=1)
    one = e.generate(messages=TURN1, params=SamplingParams(**GREEDY))[0]
    two = e.generate(messages=turn2(one.text), params=SamplingParams(**GREEDY))[0]
    return one, two


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    trace_file = str(tmp_path_factory.mktemp("traces") / "spans.jsonl")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # children inherit: export within 0.1 s
    try:
        proc, base, lines = start_serve("--prefill", "1", "--decode", "1",
                                        "--trace-file", trace_file,
                                        f"--worker-arg=--kv-cache-bytes={64 * PAGE_BYTES}")
    finally:
        del os.environ["OTEL_BSP_SCHEDULE_DELAY"]
    import openai

    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    client.trace_file = trace_file
    yield client, lines
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, "".join(lines[-40:])


def kv_bytes(lines) -> float:
    """The prefill's KV bytes written so far, over every path."""
    m = scrape(metrics_urls(lines)["prefill-0"])
    return sum(v for (name, _), v in m.items() if name == "pdmesh_kv_transfer_bytes_total")


def transfer_span(trace_file: str, cached_pages: int):
    """The prefill's `kv.transfer` span of the write that skipped `cached_pages` pages."""
    spans = [s for s in read_spans(trace_file) if s.name == "kv.transfer" and
             s.attributes.get("pdmesh.kv.cached_pages") == cached_pages]
    return spans[0] if len(spans) == 1 else None


def pages(tokens: int) -> int:
    return -(-tokens // PAGE)


def decode_prefix(turn1, prompt2: list[int]) -> int:
    """Tokens of `prompt2` the decode has cached after turn 1: full pages of turn 1's
    prompt + reply (all but the last sampled token, whose KV is never written) that
    prefix it, never the last prompt token's page."""
    have = turn1.prompt_token_ids + turn1.token_ids[:-1]
    same = next((i for i, (a, b) in enumerate(zip(have, prompt2)) if a != b),
                min(len(have), len(prompt2)))
    return min(same // PAGE, (len(prompt2) - 1) // PAGE) * PAGE


def test_second_turn_sends_only_the_new_pages(mesh, runtime):
    client, lines = mesh
    one, two = runtime
    # routable first, with a raw prompt sharing no page with the chats: a retried turn 1
    # could leave its prefix cached on the decode and the count below short
    when_routable(client.completions.create, model="default", prompt="warm up", max_tokens=1)
    before = kv_bytes(lines)
    r1 = client.chat.completions.create(model="default", messages=TURN1, **GREEDY)
    assert r1.choices[0].message.content == one.text
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    sent1 = kv_bytes(lines) - before
    # the turn's own write is every page
    assert sent1 == pages(len(one.prompt_token_ids)) * PAGE_BYTES

    r2 = client.chat.completions.create(model="default", messages=turn2(one.text), **GREEDY)
    sent2 = kv_bytes(lines) - before - sent1
    assert r2.choices[0].message.content == two.text  # same greedy tokens as no reuse
    n2, cached = len(two.prompt_token_ids), decode_prefix(one, two.prompt_token_ids)
    assert r2.usage.prompt_tokens == n2
    # the decode's prefix reaches into turn 1's reply: beyond what the prefill has cached
    # (turn 1's prompt pages only), so the reuse is the decode's
    assert cached > len(one.prompt_token_ids) // PAGE * PAGE
    assert r2.usage.prompt_tokens_details.cached_tokens == cached
    assert sent2 == (pages(n2) - cached // PAGE) * PAGE_BYTES < pages(n2) * PAGE_BYTES
    # the trace says the same: the write's span has the bytes and pages sent and skipped
    assert wait_until(lambda: transfer_span(client.trace_file, cached // PAGE), 10)
    attrs = transfer_span(client.trace_file, cached // PAGE).attributes
    assert attrs["pdmesh.kv.bytes"] == sent2
    assert attrs["pdmesh.kv.pages"] == pages(n2) - cached // PAGE
    assert wait_until(lambda: pages_back(lines), 10)


def test_streamed_turn_two_again_and_an_unrelated_prompt(mesh, runtime):
    """Turn 2 once more, streamed: its whole prompt but the last page is cached now; an
    unrelated prompt shares no page and sends them all."""
    client, lines = mesh
    one, two = runtime
    n2 = len(two.prompt_token_ids)
    before = kv_bytes(lines)
    chunks = list(client.chat.completions.create(
        model="default", messages=turn2(one.text), stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == two.text
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (n2 - 1) // PAGE * PAGE
    assert kv_bytes(lines) - before == (pages(n2) - (n2 - 1) // PAGE) * PAGE_BYTES
    before = kv_bytes(lines)
    other = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=2, temperature=0)
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    assert kv_bytes(lines) - before == pages(other.usage.prompt_tokens) * PAGE_BYTES
    assert wait_until(lambda: pages_back(lines), 10)
