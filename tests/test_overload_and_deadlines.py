"""Overload and deadlines (issue 11 item 4). Worker-side load shedding: `--shed-queued N` refuses new requests
with RESOURCE_EXHAUSTED while N already wait on the worker; the gateway retries another
worker (the busy one's circuit stays closed) and, out of attempts, answers 429 with
Retry-After. Unit: the check, both protocols, the gateway's mapping. End to end: a real
`pdmesh serve` whose one worker sheds, at 4x what it takes, then the openai client's
own retries. REST deadlines: `x-pdmesh-timeout` (or the openai client's
x-stainless-read-timeout on a non-streamed request) ends the request at its deadline
with 504, both legs freed."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import httpx2 as httpx
import openai
import pytest

from disagg_fakes import FakeEngine, FakePeers, FakeReceiver, FakeWriter
from mesh_procs import metric, metrics_urls, start_serve, terminate
from pdmesh.config import WorkerConfig
from pdmesh.disagg.decode import DecodeProtocol
from pdmesh.disagg.ports import Code, RoomError
from pdmesh.disagg.prefill import PrefillProtocol
from pdmesh.disagg.shedding import check_load
from pdmesh.services.gateway.dispatch import LegFailed
from pdmesh.services.gateway.transcoder import request_timeout


def test_check_load_counts_only_when_on_and_refuses_at_the_limit():
    check_load(0, lambda: pytest.fail("counted with shedding off"), "decode")
    check_load(3, lambda: 2, "decode")
    with pytest.raises(RoomError) as e:
        check_load(3, lambda: 3, "prefill")
    assert e.value.code is Code.RESOURCE_EXHAUSTED
    assert "prefill worker is shedding load: 3 requests" in e.value.message
    with pytest.raises(ValueError, match="shed_queued"):
        WorkerConfig(shed_queued=-1)


def test_prefill_sheds_before_touching_the_engine():
    async def main():
        eng = FakeEngine()
        eng.stats = SimpleNamespace(waiting=2)

        async def make_request(*args):
            pytest.fail("a shed request reached the engine")
        eng.make_request = make_request
        proto = PrefillProtocol(eng, FakeWriter(), 5.0, lambda t: None, shed_queued=2)
        with pytest.raises(RoomError) as e:
            await proto.prefill(1, "d:1", [1, 2, 3], None)
        assert e.value.code is Code.RESOURCE_EXHAUSTED
        assert eng.added == [] and proto.rooms == {}  # no room left behind
        eng.stats.waiting = 1
        assert proto.waiting() == 1
    asyncio.run(main())


def test_decode_counts_rooms_waiting_for_pages():
    async def main():
        eng = FakeEngine()
        eng.stats = SimpleNamespace(waiting=0)
        proto = DecodeProtocol(eng, FakePeers(), FakeReceiver(), lambda pages: pages, 5.0,
                               shed_queued=1)
        gen = proto.generate(1, "p:1", [1, 2, 3], None)
        task = asyncio.ensure_future(gen.__anext__())  # holds pages: waits for them
        for _ in range(5):
            await asyncio.sleep(0)
        assert proto.waiting() == 1  # its room has no pages yet
        with pytest.raises(RoomError) as e:
            async for _ in proto.generate(2, "p:1", [4, 5], None):
                pass
        assert e.value.code is Code.RESOURCE_EXHAUSTED and 2 not in proto.rooms
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await gen.aclose()
    asyncio.run(main())


def test_gateway_maps_a_shedding_worker_to_429_with_retry_after():
    worker = SimpleNamespace(address="127.0.0.1:1", worker_id="decode-1")
    f = LegFailed("decode", worker, grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
    assert f.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(f.trailers)["retry-after"] == "1"
    broken = LegFailed("decode", worker, grpc.StatusCode.INTERNAL, "boom")
    assert broken.code == grpc.StatusCode.UNAVAILABLE and broken.trailers == ()


# ---- end to end: pdmesh serve, one colocated worker that sheds ----------------------
@pytest.fixture(scope="module")
def shedding_mesh():
    proc, url, lines = start_serve("--prefill", "0", "--decode", "0", "--colocated", "1",
                                   "--worker-arg=--shed-queued=2",
                                   "--worker-arg=--max-running-requests=2")
    yield url, lines
    terminate(proc)


def _ask(url: str, i: int, max_tokens: int) -> tuple[int, dict, dict]:
    r = httpx.post(f"{url}/chat/completions", timeout=120, json={
        "model": "default", "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": f"Count to {i % 3 + 3}."}]})
    return r.status_code, dict(r.headers), r.json()


def test_overload_sheds_with_429_and_serves_the_rest_correctly(shedding_mesh):
    url, lines = shedding_mesh
    want = {k: _ask(url, k, 24)[2]["choices"][0]["message"]["content"] for k in range(3)}
    n = 16  # 4x what the worker takes: 2 running + 2 waiting
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: _ask(url, i, 24), range(n)))
    ok = [i for i, (status, _, _) in enumerate(results) if status == 200]
    for i, (status, headers, body) in enumerate(results):
        if status == 200:
            assert body["choices"][0]["message"]["content"] == want[i % 3]
        else:
            assert status == 429, (status, body)
            assert body["error"]["type"] == "rate_limit_error"
            assert "shedding load" in body["error"]["message"]  # no worker address in it
            assert int(headers["retry-after"]) >= 1
    # at least the 2 it runs at once get through (the engine's queue count lags a step,
    # so fewer than 2 + 2 may); the rest were refused at once, not queued
    assert len(ok) >= 2 and n - len(ok) >= 1, [r[0] for r in results]
    urls = metrics_urls(lines)
    worker = next(u for name, u in urls.items() if name.startswith("colocated"))
    gateway = urls["gateway"]
    assert metric(worker, "pdmesh_worker_kv_pages_used") == 0  # every page back
    assert metric(worker, "pdmesh_worker_rpcs_total", method="Generate",
                  code="RESOURCE_EXHAUSTED") >= n - len(ok)  # each shed counted
    states = _circuit_states(gateway)
    assert states and set(states) == {0.0}, states  # busy is not broken: circuits closed


def _circuit_states(url: str) -> list[float]:
    import urllib.request

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("pdmesh_gateway_circuit_state{")]


def test_the_openai_clients_retries_get_through(shedding_mesh):
    url, _ = shedding_mesh
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=8)
    with ThreadPoolExecutor(12) as pool:
        outs = list(pool.map(lambda i: client.chat.completions.create(
            model="default", max_tokens=8, temperature=0,
            messages=[{"role": "user", "content": "Say hi."}]).choices[0].message.content,
            range(12)))
    assert len(set(outs)) == 1 and outs[0]


# ---- REST deadlines -------------------------------------------------------------------
def test_request_timeout_from_headers():
    assert request_timeout({}, False) is None
    assert request_timeout({"x-pdmesh-timeout": "2.5"}, True) == 2.5
    assert request_timeout({"x-stainless-read-timeout": "600"}, False) == 600.0
    assert request_timeout({"x-stainless-read-timeout": "600"}, True) is None  # per chunk
    assert request_timeout({"x-stainless-read-timeout": "soon"}, False) is None
    for bad in ("0", "-1", "inf", "nan", "soon"):
        with pytest.raises(ValueError, match="x-pdmesh-timeout"):
            request_timeout({"x-pdmesh-timeout": bad}, False)


def test_a_rest_deadline_ends_the_request_and_frees_everything(shedding_mesh):
    url, lines = shedding_mesh
    body = {"model": "default", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Count to one hundred."}]}
    for stream in (False, True):
        t0 = time.monotonic()
        r = httpx.post(f"{url}/chat/completions", json={**body, "stream": stream},
                       headers={"x-pdmesh-timeout": "0.5"}, timeout=60)
        took = time.monotonic() - t0
        if stream and r.status_code == 200:  # the deadline passed mid-stream: an error event
            assert "DEADLINE_EXCEEDED" in r.text or "deadline" in r.text, r.text[-300:]
        else:
            assert r.status_code == 504, r.text
            assert "deadline" in r.json()["error"]["message"]
        assert took < 0.5 + 2.0, took
    r = httpx.post(f"{url}/chat/completions", json=body, headers={"x-pdmesh-timeout": "x"})
    assert r.status_code == 400 and "x-pdmesh-timeout" in r.json()["error"]["message"]
    worker = next(u for n, u in metrics_urls(lines).items() if n.startswith("colocated"))
    deadline = time.monotonic() + 10
    while metric(worker, "pdmesh_worker_kv_pages_used") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(worker, "pdmesh_worker_kv_pages_used") == 0
