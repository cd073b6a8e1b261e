"""The gateway under load, over fake workers (tests/gateway_fakes.py): a real registry and
`pdmesh gateway` process, as in tests/test_gateway.py.

- 256 concurrent streaming chat requests all complete, each with its own tokens (the
  fake echoes each request's prompt back);
- a multi-megabyte prompt (seconds of tokenization) does not stall the other streams:
  their inter-token gaps stay close to those of a run without it.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import aiohttp
import httpx2 as httpx
import pytest

from gateway_fakes import ECHO, SLOW, FakeMesh, start_worker
from test_gateway import KEY, MAX_LEN, REPLY, spawn, tok, wait_health  # noqa: F401 (fixture)
from pdmesh.services.gateway.server import INLINE_PROMPT_BYTES
from pdmesh.v1 import registry_pb2 as rpb

STREAMS = 256
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def mesh(tok):
    reg, m = spawn(["registry", "--host", "127.0.0.1", "--port", "0",
                    "--heartbeat-interval", "0.3"], r"listening on (\S+)")
    registry = m.group(1)
    gw, m = spawn(["gateway", "--registry", registry, "--host", "127.0.0.1", "--port", "0",
                   "--grpc-port", "0", "--api-key", KEY, "--max-model-len", str(MAX_LEN)],
                  r"listening on (\S+) \(REST\)")
    fake = FakeMesh(tok.encode(REPLY, add_special_tokens=False))
    fake.rest = m.group(1)
    # every open stream holds a thread of the fake decode (sync gRPC server)
    fake.workers = [start_worker(fake, role, registry, max_workers=STREAMS + 64)
                    for role in (rpb.WORKER_ROLE_PREFILL, rpb.WORKER_ROLE_DECODE)]
    wait_health(fake, 200)
    yield fake
    for server, client in fake.workers:
        client.close()
        server.stop(0)
    for p in (gw, reg):
        p.terminate()
        assert p.wait(10) == 0


async def stream_text(session, url: str, body: dict, times: list[float] | None = None,
                      streaming: threading.Event | None = None) -> tuple[str, list[float]]:
    """POST a streaming chat request; (its text, the receive time of each content event,
    appended to `times` when given). Sets `streaming` at the first content event."""
    text, times = [], [] if times is None else times
    async with session.post(url, json={**body, "stream": True}, headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    text.append(delta["content"])
                    times.append(time.monotonic())
                    if streaming is not None:
                        streaming.set()
    return "".join(text), times


def test_256_concurrent_streams_each_get_their_own_tokens(mesh, tok):
    url = f"http://{mesh.rest}/v1/chat/completions"
    convos = [[{"role": "user", "content": f"Stream {i}: count {i * 7919 % 1000} apples."}]
              for i in range(STREAMS)]
    mesh.peak = 0

    async def run():
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as s:
            return await asyncio.gather(*(stream_text(s, url, {
                "model": "default", "messages": c, "max_tokens": 200, "seed": ECHO})
                for c in convos))

    results = asyncio.run(run())
    for convo, (text, _) in zip(convos, results):
        assert text == tok.decode(tok.apply_chat_template(convo))  # its own prompt, echoed
    assert len({text for text, _ in results}) == STREAMS
    assert mesh.peak >= STREAMS // 4, mesh.peak  # the streams really ran side by side


def test_a_long_prompt_is_tokenized_on_a_thread_and_served(mesh, tok):
    convo = [{"role": "user", "content": " ".join(["lighthouse"] * 230)}]
    assert len(convo[0]["content"]) > INLINE_PROMPT_BYTES  # the thread path
    body = {"model": "default", "messages": convo, "max_tokens": 150, "seed": ECHO}

    async def run():
        async with aiohttp.ClientSession() as s:
            return await stream_text(s, f"http://{mesh.rest}/v1/chat/completions", body)

    text, _ = asyncio.run(run())
    assert text == tok.decode(tok.apply_chat_template(convo)[:150])


def slow_stream_gaps(mesh, until: threading.Event | None = None,
                     streaming: threading.Event | None = None) -> list[float]:
    """Gaps between consecutive tokens of SLOW streams (0.1 s a token), run one after
    another: two streams, or until `until` is set. Gaps across two streams count (a
    stall before a stream's first token is a stall too). `streaming` is set at the
    first token."""
    url, times = f"http://{mesh.rest}/v1/chat/completions", []
    body = {"model": "default", "max_tokens": 30, "seed": SLOW,
            "messages": [{"role": "user", "content": "hi"}]}

    async def run():
        async with aiohttp.ClientSession() as s:
            for n in range(1000):
                await stream_text(s, url, body, times, streaming)
                if (until is None and n == 1) or (until is not None and until.is_set()):
                    return

    asyncio.run(run())
    return [b - a for a, b in zip(times, times[1:])]


def test_a_multi_megabyte_prompt_does_not_stall_other_streams(mesh):
    baseline = max(slow_stream_gaps(mesh))
    big = {"model": "default", "messages": [
        {"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 90000}]}
    streaming, done, status, took = threading.Event(), threading.Event(), [], []

    def post_big():
        streaming.wait(30)
        t0 = time.monotonic()
        r = httpx.post(f"http://{mesh.rest}/v1/chat/completions", json=big, headers=AUTH,
                       timeout=120)
        took.append(time.monotonic() - t0)
        status.append(r.status_code)
        done.set()

    poster = threading.Thread(target=post_big)
    poster.start()
    gaps = slow_stream_gaps(mesh, until=done, streaming=streaming)
    poster.join()
    assert status == [400]  # 4 MB is far past the context limit, found by tokenizing it
    assert took[0] > 3 * baseline  # tokenizing took long enough to have stalled a stream
    # ~0.1 s a token (a little more from one stream to the next) with or without the big
    # prompt; a stall would add the tokenization time (seconds)
    assert max(gaps) < baseline + 0.5, (max(gaps), baseline, took)
