"""n > 1 end to end: `pdmesh serve` (real processes, Mooncake/shm KV transfer), the real
`openai` client and the gateway's gRPC API. At 1P1D each request is prefilled once and
its KV transferred once (the workers' metrics say so) whatever n is; the decode forks it
into n choices: indices 0..n-1, seeded choices reproducible and not all alike, greedy ones
equal to the n = 1 output, streams with one finish chunk per choice and one usage chunk,
usage counting the prompt once. Colocated: the same answers, the prompt computed once.
Every KV page is back afterwards, also after a client leaves mid-stream."""
from __future__ import annotations

import re
import signal
import urllib.request
from collections import defaultdict

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh_procs import (chat_when_routable, metrics_urls, pools_free, start_serve,
                        wait_until, worker_addresses)

MAX_TOKENS = 6
MESSAGES = [{"role": "user", "content": "Describe the sea in a few words."}]
PROMPT = "The old lighthouse keeper looked at the"
# fp32 SmolLM2-135M pages of 16 tokens: small pools start fast
PAGE_BYTES = 30 * 2 * 16 * 3 * 64 * 4
POOL = f"--worker-arg=--kv-cache-bytes={256 * PAGE_BYTES}"
SAMPLED = dict(temperature=0.9, seed=1234, max_tokens=MAX_TOKENS,
               extra_body={"ignore_eos": True})


def serve(*layout: str):
    proc, base, lines = start_serve(*layout, POOL)
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    chat_when_routable(client, model="default", messages=MESSAGES, max_tokens=1)
    return proc, client, lines


@pytest.fixture(scope="module")
def pd():
    proc, client, lines = serve("--prefill", "1", "--decode", "1")
    yield client, lines
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, "".join(lines[-40:])


@pytest.fixture(scope="module")
def colocated():
    proc, client, lines = serve("--prefill", "0", "--decode", "0", "--colocated", "1")
    yield client, lines
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, "".join(lines[-40:])


# -- helpers ----------------------------------------------------------------------------------
def ask(client, kind: str, n: int, stream: bool = False, **kw):
    """One chat or completions request; (texts by choice index, finish reasons, usage)."""
    args = dict(model="default", n=n, stream=stream, **kw)
    if stream:
        args["stream_options"] = {"include_usage": True}
    if kind == "chat":
        res = client.chat.completions.create(messages=MESSAGES, **args)
    else:
        res = client.completions.create(prompt=PROMPT, **args)
    if not stream:
        text = [c.message.content if kind == "chat" else c.text for c in res.choices]
        assert [c.index for c in res.choices] == list(range(n))
        return text, [c.finish_reason for c in res.choices], res.usage
    texts, finishes, usages = defaultdict(str), defaultdict(list), []
    for chunk in res:
        if chunk.usage is not None:
            assert not chunk.choices  # the usage chunk has no choice
            usages.append(chunk.usage)
            continue
        assert not usages, "a chunk after the usage chunk"
        for c in chunk.choices:
            texts[c.index] += (c.delta.content or "") if kind == "chat" else c.text
            if c.finish_reason:
                finishes[c.index].append(c.finish_reason)
    assert sorted(texts) == list(range(n)) and len(usages) == 1
    assert all(len(finishes[i]) == 1 for i in range(n)), finishes  # one end per choice
    return [texts[i] for i in range(n)], [finishes[i][0] for i in range(n)], usages[0]


def scrape(url: str) -> dict[tuple, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def transfers(lines) -> dict[str, float]:
    """The prefill's Prefill and Transfer calls and KV writes so far (any KV path)."""
    m = scrape(metrics_urls(lines)["prefill-0"])
    rpc = lambda method: m.get(("pdmesh_worker_rpcs_total",  # noqa: E731
                                (("code", "OK"), ("method", method))), 0.0)
    writes = sum(v for (name, _), v in m.items() if name == "pdmesh_kv_transfer_seconds_count")
    return {"prefills": rpc("Prefill"), "transfers": rpc("Transfer"), "writes": writes}


def pages_back(lines) -> bool:
    return pools_free([], worker_addresses(lines, "decode") + worker_addresses(lines, "colocated"))


def check_choices(texts, finishes, usage, n: int, prompt_tokens: int | None = None) -> None:
    assert len(texts) == n and all(texts) and finishes == ["length"] * n
    assert usage.completion_tokens == n * MAX_TOKENS  # summed over the choices
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if prompt_tokens is not None:
        assert usage.prompt_tokens == prompt_tokens  # the prompt, once


# -- 1P1D -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_one_prefill_one_transfer_n_choices(pd, kind):
    client, lines = pd
    prompt_tokens = ask(client, kind, 1, max_tokens=1)[2].prompt_tokens
    before, requests = transfers(lines), 0
    for n in (2, 4):
        first = ask(client, kind, n, **SAMPLED)
        again = ask(client, kind, n, **SAMPLED)
        streamed = ask(client, kind, n, stream=True, **SAMPLED)
        requests += 3
        for got in (first, again, streamed):
            check_choices(*got, n, prompt_tokens)
        assert again[0] == first[0] and streamed[0] == first[0]  # reproducible, any form
        assert len(set(first[0])) > 1, first[0]  # temperature 0.9: not all alike
    after = transfers(lines)
    # one prefill, one Transfer, one KV write per request, whatever n
    assert {k: after[k] - before[k] for k in after} == dict.fromkeys(after, requests)
    assert wait_until(lambda: pages_back(lines), 10)


def test_greedy_choices_equal_the_single_output(pd):
    client, lines = pd
    greedy = dict(temperature=0, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
    (one,), _, _ = ask(client, "chat", 1, **greedy)
    texts, finishes, usage = ask(client, "chat", 2, **greedy)
    assert texts == [one, one]
    texts, _, _ = ask(client, "completions", 2, stream=True, **greedy)
    (one,), _, _ = ask(client, "completions", 1, **greedy)
    assert texts == [one, one]
    assert wait_until(lambda: pages_back(lines), 10)


def test_choices_above_the_limit_are_400(pd):
    client, _ = pd
    with pytest.raises(openai.BadRequestError, match="'n' must be at most 16"):
        ask(client, "chat", 17, max_tokens=1)


def test_client_leaving_mid_stream_frees_every_choice(pd):
    client, lines = pd
    res = client.chat.completions.create(
        model="default", messages=MESSAGES, n=4, stream=True, max_tokens=400,
        temperature=0.9, extra_body={"ignore_eos": True})
    seen = set()
    for chunk in res:
        seen.update(c.index for c in chunk.choices)
        if len(seen) == 4:
            break  # every choice is decoding
    res.close()
    assert seen == {0, 1, 2, 3}
    assert wait_until(lambda: pages_back(lines), 20)


def test_grpc_generate_streams_indexed_choices(pd):
    from pdmesh.client import Client

    client, lines = pd
    addr = re.search(r"and (\S+) \(gRPC\)", "".join(lines)).group(1)
    tokens, ends = defaultdict(list), {}
    with Client(addr) as c:
        for msg in c.generate_stream(PROMPT, n=3, max_tokens=MAX_TOKENS, temperature=0.9,
                                     seed=7, ignore_eos=True):
            tokens[msg.index] += msg.token_ids
            if msg.finish_reason:
                ends[msg.index] = msg.usage.completion_tokens
    assert sorted(tokens) == [0, 1, 2] and ends == {0: MAX_TOKENS, 1: MAX_TOKENS, 2: MAX_TOKENS}
    assert all(len(t) == MAX_TOKENS for t in tokens.values())
    with Client(addr) as c, pytest.raises(ValueError, match="chat_stream"):
        next(c.generate(PROMPT, n=2, max_tokens=MAX_TOKENS))  # texts would interleave


# -- colocated --------------------------------------------------------------------------------
def test_colocated_n_choices(colocated):
    client, lines = colocated
    greedy = dict(temperature=0, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
    (one,), _, _ = ask(client, "chat", 1, **greedy)
    assert ask(client, "chat", 3, **greedy)[0] == [one] * 3
    first = ask(client, "chat", 3, **SAMPLED)
    streamed = ask(client, "chat", 3, stream=True, **SAMPLED)
    check_choices(*first, 3), check_choices(*streamed, 3)
    assert streamed[0] == first[0] and len(set(first[0])) > 1
    texts = ask(client, "completions", 2, **SAMPLED)[0]
    assert ask(client, "completions", 2, stream=True, **SAMPLED)[0] == texts
    assert wait_until(lambda: pages_back(lines), 10)
