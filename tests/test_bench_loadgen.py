"""pdmesh.bench.loadgen against a scripted SSE server (unit test of the client layer).

The server streams chunks at known times, so the measured TTFT / ITL / e2e can be checked
against the schedule; the end-to-end test against a real mesh is tests/test_bench_e2e.py.
"""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web

from pdmesh.bench.loadgen import ClientConfig, run_fixed, run_rate, send_request
from pdmesh.bench.workload import BenchRequest, Workload, WorkloadSpec

FIRST, GAP, PIECES = 0.3, 0.1, 4  # first content chunk after 0.3 s, then one per 0.1 s


class WordTokenizer:
    """Stands in for a HF tokenizer: one token per space-separated word."""
    vocab_size = 1000

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)

    def encode(self, text, add_special_tokens=True):
        return text.split()


class Server:
    """Scripted OpenAI endpoint; the prompt picks the behaviour ("hang", "500", "nousage")."""

    def __init__(self, paced: bool = False) -> None:
        self.paced = paced
        self.bodies, self.headers, self.in_flight, self.max_in_flight = [], [], 0, 0
        self.arrivals: list[float] = []

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    async def stream(self, request):
        body = await request.json()
        self.bodies.append(body), self.headers.append(dict(request.headers))
        self.arrivals.append(time.perf_counter())
        prompt = body.get("prompt") or body["messages"][0]["content"]
        if prompt == "500":
            return web.Response(status=500, text="boom")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            chat = "messages" in body
            send = lambda d: resp.write(f"data: {json.dumps(d)}\n\n".encode())  # noqa: E731
            if chat:  # role-only first chunk: empty content must not count as the first token
                await send({"choices": [{"index": 0, "delta": {"role": "assistant",
                                                               "content": ""}}]})
            await asyncio.sleep(3600 if prompt == "hang" else FIRST)
            # paced mode: one chunk per requested token, like a real server with ignore_eos
            n = body["max_tokens"] if self.paced else PIECES
            for i in range(n):
                if i:
                    await asyncio.sleep(GAP)
                piece = f" word{i}"
                await send({"choices": [{"index": 0, "delta": {"content": piece}}]} if chat
                           else {"choices": [{"index": 0, "text": piece}]})
            if prompt != "nousage" and (body.get("stream_options") or {}).get("include_usage"):
                await send({"choices": [], "usage": {"prompt_tokens": 11,
                                                     "completion_tokens": n if self.paced else 7}})
            await resp.write(b"data: [DONE]\n\n")
            return resp
        finally:
            self.in_flight -= 1


async def serving(fn, paced: bool = False):
    """Run `fn(base_url, server)` with the scripted server on a free port."""
    server = Server(paced)
    app = web.Application()
    app.router.add_get("/v1/models", server.models)
    app.router.add_post("/v1/completions", server.stream)
    app.router.add_post("/v1/chat/completions", server.stream)
    # handler_cancellation: a client that times out ends the "hang" handler at once
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await fn(f"http://127.0.0.1:{port}/v1", server)
    finally:
        await runner.cleanup()


def workload() -> Workload:
    return Workload(WorkloadSpec((5, 8), (3, 3), prompt_ids="uniform"), WordTokenizer())


@pytest.mark.parametrize("backend", ["completions", "chat"])
def test_timing_follows_the_chunk_schedule(backend):
    import aiohttp

    async def go(url, server):
        cfg = ClientConfig(url, model="m", api_key="sk-test", backend=backend)
        async with aiohttp.ClientSession() as s:
            return (await send_request(s, cfg, BenchRequest("hello", 5, 3), workload()),
                    await send_request(s, cfg, BenchRequest("nousage", 5, 3), workload()),
                    server)

    r, no_usage, server = asyncio.run(serving(go))
    assert r.ok and r.error == ""
    assert FIRST - 0.01 <= r.ttft < FIRST + 0.25  # the role-only chunk did not count
    assert len(r.itl) == PIECES - 1 and sum(r.itl) == pytest.approx(GAP * 3, abs=0.15)
    assert r.e2e >= r.ttft + sum(r.itl) - 1e-6
    assert (r.output_tokens, r.prompt_tokens) == (7, 11)  # usage wins when present
    assert r.tpot == pytest.approx((r.e2e - r.ttft) / 6)
    assert (no_usage.output_tokens, no_usage.prompt_tokens) == (PIECES, 5)  # tokenizer count
    body = server.bodies[0]
    assert body["max_tokens"] == 3 and body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["model"] == "m"
    assert server.headers[0]["Authorization"] == "Bearer sk-test"
    assert ("messages" in body) == (backend == "chat")


def test_failures_are_counted_and_timeouts_do_not_hang():
    import aiohttp

    async def go(url, server):
        cfg = ClientConfig(url, model="m", timeout_s=0.8)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.8)) as s:
            t0 = time.perf_counter()
            out = await asyncio.gather(send_request(s, cfg, BenchRequest("hang", 1, 3)),
                                       send_request(s, cfg, BenchRequest("500", 1, 3)))
            return out, time.perf_counter() - t0

    (hang, err), took = asyncio.run(serving(go))
    assert not hang.ok and "timeout" in hang.error and took < 5
    assert not err.ok and err.error.startswith("HTTP 500: boom")
    dead = ClientConfig("http://127.0.0.1:9/v1", model="m")  # nothing listens on port 9

    async def refused():
        async with aiohttp.ClientSession() as s:
            return await send_request(s, dead, BenchRequest("x", 1, 3))
    r = asyncio.run(refused())
    assert not r.ok and "Connect" in r.error


def test_run_fixed_keeps_concurrency_and_resolves_model():
    async def go(url, server):
        s, recs = await run_fixed(ClientConfig(url), workload(), 3, 10, label="t",
                                  warmup_requests=2, progress=False, slo_ttft=10.0)
        return s, recs, server

    s, recs, server = asyncio.run(serving(go))
    assert server.max_in_flight == 3 and len(server.bodies) == 12  # 2 warm-up + 10
    assert all(b["model"] == "fake-model" for b in server.bodies)
    assert all(b["max_tokens"] == 3 for b in server.bodies)
    assert (s.number, s.completed, s.failed, s.concurrency, s.label) == (10, 10, 0, 3, "t")
    assert s.request_rate is None and s.goodput_req_s == pytest.approx(s.req_s)
    assert s.output_tok_s == pytest.approx(70 / s.duration_s)
    # 10 requests, 3 at a time, each >= FIRST + 3 GAP: at least 4 waves
    assert s.duration_s >= 4 * (FIRST + 3 * GAP) - 0.05 and len(recs) == 10


def test_run_rate_spreads_arrivals():
    async def go(url, server):
        s, _ = await run_rate(ClientConfig(url), workload(), 8.0, 12, progress=False)
        return s, server

    s, server = asyncio.run(serving(go))
    assert s.request_rate == 8.0 and s.concurrency is None and s.completed == 12
    span = server.arrivals[-1] - server.arrivals[0]
    assert 0.3 < span < 6  # 11 exponential gaps of mean 1/8 s (seeded)
    with pytest.raises(ValueError, match="request_rate"):
        asyncio.run(run_rate(ClientConfig("http://x/v1", model="m"), workload(), 0, 1))
