"""Admission at the gateway (services/gateway/admission.py).

Unit tests of the limiter (plain asyncio), then the gateway end to end over the fakes of
tests/gateway_fakes.py (a real registry and real `pdmesh gateway` processes, as in
tests/test_gateway_load.py): at 4x overload the excess gets 429 + Retry-After (REST) and
RESOURCE_EXHAUSTED + retry-after (gRPC), the admitted requests complete, and the
`openai` client's own retries get every request through a small limit.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import threading
import time

import aiohttp
import grpc
import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway_fakes import ECHO, SLOW, FakeMesh, start_worker
from test_gateway import ENV, REPLY, spawn, tok  # noqa: F401 (fixture)
from pdmesh.client import AsyncClient
from pdmesh.services.gateway.admission import QUEUE_FULL, QUEUE_TIMEOUT, Admission, Rejected
from pdmesh.telemetry.metrics import GatewayMetrics
from pdmesh.v1 import registry_pb2 as rpb


def run(coro):
    return asyncio.run(coro)


async def _settle():
    """Let every ready task run up to its next wait."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_limit_then_queue_then_reject():
    async def main():
        adm = Admission(max_inflight=2, max_queued=1, queue_timeout_s=5)
        await adm.acquire(), await adm.acquire()
        waiter = asyncio.ensure_future(adm.acquire())
        await _settle()
        assert (adm.inflight, adm.queued, waiter.done()) == (2, 1, False)
        with pytest.raises(Rejected) as e:
            await adm.acquire()
        assert e.value.reason == QUEUE_FULL and 0.5 <= e.value.retry_after_s <= 1.5
        adm.release()  # the slot goes to the waiter
        await waiter
        assert (adm.inflight, adm.queued) == (2, 0)
        adm.release(), adm.release()
        assert (adm.inflight, adm.queued) == (0, 0)
        adm.close()
    run(main())


def test_waiters_are_served_in_arrival_order():
    async def main():
        adm, order = Admission(max_inflight=1, max_queued=10, queue_timeout_s=5), []
        await adm.acquire()

        async def one(i):
            async with adm.slot():
                order.append(i)
                await asyncio.sleep(0.001)
        tasks = []
        for i in range(10):
            tasks.append(asyncio.ensure_future(one(i)))
            await _settle()  # queued one after another
        assert adm.queued == 10
        adm.release()
        await asyncio.gather(*tasks)
        assert order == list(range(10)) and (adm.inflight, adm.queued) == (0, 0)
    run(main())


def test_queue_timeout_rejects_and_frees_the_place():
    async def main():
        metrics = GatewayMetrics()
        adm = Admission(max_inflight=1, max_queued=2, queue_timeout_s=0.05, metrics=metrics)
        await adm.acquire()
        with pytest.raises(Rejected) as e:
            await adm.acquire()
        assert e.value.reason == QUEUE_TIMEOUT and adm.queued == 0
        assert metrics.admission_rejected.labels(QUEUE_TIMEOUT)._value.get() == 1
        adm.release()
        assert (adm.inflight, adm.queued) == (0, 0)
        assert metrics.admission_inflight._value.get() == metrics.admission_queued._value.get() == 0
        adm.close()
    run(main())


def test_cancel_while_queued_leaves_the_queue():
    async def main():
        adm = Admission(max_inflight=1, max_queued=5, queue_timeout_s=0)  # 0: no timeout
        await adm.acquire()
        gone = asyncio.ensure_future(adm.acquire())
        stays = asyncio.ensure_future(adm.acquire())
        await _settle()
        gone.cancel()  # its client went away
        await _settle()
        assert adm.queued == 1
        adm.release()
        await stays  # skipped the cancelled one
        assert (adm.inflight, adm.queued) == (1, 0)
        adm.release()
        assert adm.inflight == 0
    run(main())


def test_a_slot_handed_to_a_cancelled_waiter_is_passed_on():
    async def main():
        adm = Admission(max_inflight=1, max_queued=5, queue_timeout_s=5)
        await adm.acquire()
        first = asyncio.ensure_future(adm.acquire())
        second = asyncio.ensure_future(adm.acquire())
        await _settle()
        adm.release()  # hands the slot to `first`...
        first.cancel()  # ...which is cancelled before it runs again
        await _settle()
        assert first.cancelled() and second.done()
        assert (adm.inflight, adm.queued) == (1, 0)
        adm.release()
        assert adm.inflight == 0
        adm.close()
    run(main())


def test_no_limit_counts_but_never_waits():
    async def main():
        adm = Admission()  # max_inflight 0
        for _ in range(1000):
            await adm.acquire()
        assert (adm.inflight, adm.queued) == (1000, 0)
        for _ in range(1000):
            adm.release()
        assert adm.inflight == 0
    run(main())


def test_rejecting_logs_once_when_it_starts_and_once_when_it_stops(caplog, monkeypatch):
    import pdmesh.services.gateway.admission as admission
    monkeypatch.setattr(admission, "_QUIET_S", 0.05)

    async def main():
        adm = Admission(max_inflight=1, max_queued=0, retry_after_s=2)
        await adm.acquire()
        for _ in range(20):
            with pytest.raises(Rejected) as e:
                await adm.acquire()
        assert dict(e.value.retry_headers())["retry-after"] in ("1", "2", "3")
        assert 1000 <= int(dict(e.value.retry_headers())["retry-after-ms"]) <= 3000
        await asyncio.sleep(0.2)
        adm.release()
    with caplog.at_level(logging.WARNING, logger=admission.__name__):
        run(main())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "rejecting requests" in lines[0] and "stopped rejecting (20 rejected" in lines[1]


def test_bad_limits_are_refused():
    with pytest.raises(ValueError):
        Admission(max_inflight=-1)
    with pytest.raises(ValueError):
        Admission(retry_after_s=0)


# --- end to end: real registry and gateway processes, fake workers --------------------

GATEWAYS = {  # name -> extra flags
    "limited": ["--max-inflight", "8", "--max-queued", "8", "--queue-timeout", "20"],
    "no_queue": ["--max-inflight", "4", "--max-queued", "0", "--retry-after", "1"],
    "unlimited": [],
}


class Gateway:
    """A `pdmesh gateway` process; its output is read on a thread (kept in `lines`)."""

    def __init__(self, registry: str, flags: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pdmesh.cli", "gateway", "--registry", registry, "--host",
             "127.0.0.1", "--port", "0", "--grpc-port", "0", "--max-model-len", "512", *flags],
            env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if m := re.search(r"listening on (\S+) \(REST\) and (\S+) \(gRPC\)", line):
                self.rest, self.grpc = m.group(1), m.group(2)
                self.ready.set()

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = httpx.get(f"http://{self.rest}/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    def logged(self, text: str) -> int:
        return sum(text in line for line in self.lines)


@pytest.fixture(scope="module")
def mesh(tok):
    """A registry, fake prefill + decode workers and the three gateways of GATEWAYS."""
    reg, m = spawn(["registry", "--host", "127.0.0.1", "--port", "0",
                    "--heartbeat-interval", "0.3"], r"listening on (\S+)")
    fake = FakeMesh(tok.encode(REPLY, add_special_tokens=False))
    fake.workers = [start_worker(fake, role, m.group(1), max_workers=256 + 64)
                    for role in (rpb.WORKER_ROLE_PREFILL, rpb.WORKER_ROLE_DECODE)]
    fake.gateways = {name: Gateway(m.group(1), flags) for name, flags in GATEWAYS.items()}
    for gw in fake.gateways.values():  # started side by side, waited for in turn
        assert gw.ready.wait(60), "".join(gw.lines)
    yield fake
    for server, client in fake.workers:
        client.close()
        server.stop(0)
    for p in [gw.proc for gw in fake.gateways.values()] + [reg]:
        p.terminate()
        assert p.wait(10) == 0


def convo(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Request {i}: {i * 7919 % 1000} pears."}]


async def rest_stream(session, gw: Gateway, i: int, max_tokens: int, seed: int = ECHO):
    """('ok', text) or (HTTP status, headers, error JSON) of one streaming chat request."""
    body = {"model": "default", "messages": convo(i), "max_tokens": max_tokens, "seed": seed,
            "stream": True}
    async with session.post(f"http://{gw.rest}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            return resp.status, dict(resp.headers), await resp.json()
        text = []
        async for line in resp.content:
            if line.startswith(b"data: {"):
                text.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
        return "ok", "".join(text)


async def grpc_stream(client: AsyncClient, i: int, max_tokens: int):
    """('ok', text) or (status code, trailing metadata) of one gRPC Chat stream."""
    try:
        text = [r.text async for r in client.chat_stream(convo(i), max_tokens=max_tokens,
                                                           seed=ECHO)]
        return "ok", "".join(text)
    except grpc.aio.AioRpcError as e:
        return e.code(), dict(e.trailing_metadata() or ())


def echoed(tok, i: int, max_tokens: int) -> str:
    """What the ECHO fake streams for request i: its own prompt's first tokens."""
    return tok.decode(tok.apply_chat_template(convo(i))[:max_tokens])


def test_4x_overload_sheds_the_excess_and_serves_the_rest(mesh, tok):
    gw, n, max_tokens = mesh.gateways["limited"], 64, 40  # ~0.8 s a stream
    mesh.peak = 0

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s, \
                AsyncClient(gw.grpc) as c:
            return await asyncio.gather(
                *(rest_stream(s, gw, i, max_tokens) for i in range(0, n, 2)),
                *(grpc_stream(c, i, max_tokens) for i in range(1, n, 2)))

    t0 = time.monotonic()
    results = asyncio.run(main())
    took = time.monotonic() - t0
    order = list(range(0, n, 2)) + list(range(1, n, 2))
    ok = [i for i, r in zip(order, results) if r[0] == "ok"]
    for i, r in zip(order, results):
        if r[0] == "ok":
            assert r[1] == echoed(tok, i, max_tokens)  # its own tokens, complete
        elif i % 2 == 0:
            status, headers, err = r
            assert status == 429 and err["error"]["type"] == "rate_limit_error", r
            assert err["error"]["code"] == "rate_limit_exceeded"
            assert int(headers["Retry-After"]) >= 1 and int(headers["retry-after-ms"]) > 0
        else:
            assert r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and int(r[1]["retry-after"]) >= 1
    assert len(ok) >= 16 and n - len(ok) >= 32, (len(ok), took)  # 8 + 8 queued, then more
    assert mesh.peak <= 8, mesh.peak  # never more than --max-inflight streams at once
    assert took < 30
    after_overload(gw, n - len(ok))


def after_overload(gw: Gateway, rejected: int) -> None:
    """Gauges back to 0, every rejection counted and logged once, a new request served."""
    m = gw.metrics()
    assert m[("pdmesh_gateway_admission_inflight", ())] == 0
    assert m[("pdmesh_gateway_admission_queued", ())] == 0
    assert sum(v for (name, _), v in m.items()
               if name == "pdmesh_gateway_admission_rejected_total") == rejected
    deadline = time.monotonic() + 5
    while not gw.logged("stopped rejecting") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gw.logged("rejecting requests") == 1 and gw.logged("stopped rejecting") == 1, \
        gw.lines

    async def one():
        async with aiohttp.ClientSession() as s:
            return await rest_stream(s, gw, 1000, 5)
    assert asyncio.run(one())[0] == "ok"


def test_openai_client_retries_its_way_through_a_small_limit(mesh, tok):
    gw, n = mesh.gateways["no_queue"], 32
    before = sum(v for (name, _), v in gw.metrics().items()
                 if name == "pdmesh_gateway_admission_rejected_total")

    async def main():
        client = openai.AsyncOpenAI(base_url=f"http://{gw.rest}/v1", api_key="unused",
                                    max_retries=5)
        async with client:
            return await asyncio.gather(*(client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": f"hi {i}"}],
                max_tokens=3, seed=SLOW) for i in range(n)))  # ~0.3 s each

    results = asyncio.run(main())
    assert [r.choices[0].message.content for r in results] == [tok.decode(mesh.reply_ids[:3])] * n
    rejected = sum(v for (name, _), v in gw.metrics().items()
                   if name == "pdmesh_gateway_admission_rejected_total") - before
    assert rejected >= n - 4  # every request past the first 4 was turned away at least once


def test_256_concurrent_with_no_limit_are_all_served(mesh, tok):
    gw, n, max_tokens = mesh.gateways["unlimited"], 256, 20

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            return await asyncio.gather(*(rest_stream(s, gw, i, max_tokens) for i in range(n)))

    results = asyncio.run(main())
    assert [r[0] for r in results] == ["ok"] * n
    assert all(r[1] == echoed(tok, i, max_tokens) for i, r in enumerate(results))
    m = gw.metrics()
    assert not any(name == "pdmesh_gateway_admission_rejected_total" for name, _ in m)
    assert m[("pdmesh_gateway_admission_inflight", ())] == 0


def test_clients_that_disconnect_while_queued_leave_the_queue(mesh):
    gw = mesh.gateways["limited"]

    async def gauges(s):
        async with s.get(f"http://{gw.rest}/metrics") as r:
            text = await r.text()
        found = {s.name: s.value for f in text_string_to_metric_families(text)
                 for s in f.samples}
        return (found["pdmesh_gateway_admission_inflight"],
                found["pdmesh_gateway_admission_queued"])

    async def until(s, want):
        for _ in range(100):
            if await gauges(s) == want:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"gauges {await gauges(s)}, expected {want}")

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s, \
                AsyncClient(gw.grpc) as c:
            holders = [asyncio.ensure_future(rest_stream(s, gw, i, 30, SLOW)) for i in range(8)]
            await until(s, (8, 0))  # 3 s streams hold every slot
            queued = [asyncio.ensure_future(rest_stream(s, gw, i, 5)) for i in range(4)]
            queued += [asyncio.ensure_future(grpc_stream(c, i, 5)) for i in range(4)]
            await until(s, (8, 8))
            for t in queued:  # the clients go away (REST: the connection closes)
                t.cancel()
            await until(s, (8, 0))  # their places are free while the slots are still held
            for t in holders:
                t.cancel()
            await until(s, (0, 0))
    asyncio.run(main())


def test_flags_and_env_set_the_limits(monkeypatch):
    import argparse

    from pdmesh.commands import gateway as cmd
    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    monkeypatch.setenv("PDMESH_GATEWAY_MAX_INFLIGHT", "5")
    monkeypatch.setenv("PDMESH_GATEWAY_QUEUE_TIMEOUT", "2.5")
    c = cmd.config_from_args(p.parse_args([]))
    assert (c.max_inflight, c.queue_limit, c.queue_timeout_s, c.retry_after_s) == (5, 5, 2.5, 1)
    c = cmd.config_from_args(p.parse_args(["--max-inflight", "7", "--max-queued", "0",
                                           "--retry-after", "0.5"]))
    assert (c.max_inflight, c.queue_limit, c.retry_after_s) == (7, 0, 0.5)
    with pytest.raises(ValueError):
        cmd.config_from_args(p.parse_args(["--max-queued", "-1"]))


def test_serve_passes_the_admission_flags_to_its_gateway():
    import argparse

    from pdmesh.commands import gateway, serve
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    args = p.parse_args(["--max-inflight", "64", "--gateway-arg=--processes=2",
                         "--queue-timeout", "5"])
    assert args.gateway_arg == ["--max-inflight=64", "--processes=2", "--queue-timeout=5.0"]
    g = argparse.ArgumentParser()
    gateway.add_arguments(g)
    c = gateway.config_from_args(g.parse_args(args.gateway_arg))
    assert (c.max_inflight, c.processes, c.queue_timeout_s) == (64, 2, 5.0)
