"""Gateway routing: policies alone, the WorkerPool's events and modes, the pool fed by a
real (in-process) registry through Watch, and the transcoder's route table."""
from __future__ import annotations

import asyncio
import collections
import random
import threading
import time

import pytest

from pdmesh.config import GatewayConfig, RegistryConfig, gateway_config_from_env
from pdmesh.registry_client import RegistryClient
from pdmesh.services.bootstrap.server import create_server as create_registry
from pdmesh.services.gateway.pool import NoRoute, WorkerPool
from pdmesh.services.gateway.routing import (Load, PowerOfTwoPolicy, Worker, make_policy,
                                             register_policy)
from pdmesh.services.gateway.transcoder import build_app, http_routes
from pdmesh.v1 import gateway_pb2
from pdmesh.v1 import registry_pb2 as rpb


def workers(n, role="DECODE"):
    return [Worker(f"w{i}", role, f"10.0.0.{i}:1", "m") for i in range(n)]


def counts(policy, ws, n=3000):
    return collections.Counter(policy(ws).worker_id for _ in range(n))


def test_random_and_round_robin_spread_evenly():
    ws = workers(3)
    rr = counts(make_policy("round_robin"), ws, 300)
    assert rr == {"w0": 100, "w1": 100, "w2": 100}
    rnd = counts(make_policy("random"), ws)
    assert all(800 < c < 1200 for c in rnd.values()) and len(rnd) == 3


def test_power_of_two_avoids_the_loaded_worker():
    ws = workers(3)
    ws[0].load = Load(running=50)
    c = counts(PowerOfTwoPolicy(random.Random(0)), ws)
    assert "w0" not in c  # any pair holding w0 holds a less loaded worker
    assert all(1200 < v < 1800 for v in c.values())


def test_least_load_picks_the_minimum_and_breaks_ties():
    ws = workers(3)
    ws[0].load, ws[1].load, ws[2].load = Load(running=3), Load(running=1), Load(queued=1)
    ws[1].load.free_kv_pages = 100  # same count: more free pages wins
    assert set(counts(make_policy("least_load"), ws, 200)) == {"w1"}
    ws[1].load.free_kv_pages = 0
    assert set(counts(make_policy("least_load"), ws, 200)) == {"w1", "w2"}


def test_inflight_requests_count_between_heartbeats():
    pool = WorkerPool(mode="colocated", decode_policy="least_load")
    for i in range(2):
        pool.apply("JOINED", rpb.WorkerInfo(worker_id=f"c{i}", role=rpb.WORKER_ROLE_COLOCATED,
                                            address=f"h:{i}", model_id="m"))
    routes = [pool.route() for _ in range(4)]
    assert collections.Counter(r.decode.worker_id for r in routes) == {"c0": 2, "c1": 2}
    for r in routes:
        pool.release(r)
    assert all(w.inflight == 0 for w in pool.workers())


def test_unknown_policy_and_plugin_registry():
    with pytest.raises(ValueError, match="unknown routing policy 'nope'"):
        make_policy("nope")
    register_policy("first", lambda: (lambda cands: cands[0]))
    assert make_policy("first")(workers(3)).worker_id == "w0"
    with pytest.raises(ValueError, match="mode"):
        GatewayConfig(mode="both")
    cfg = gateway_config_from_env(env={"PDMESH_PREFILL_POLICY": "least_load",
                                       "PDMESH_API_KEY": "k"})
    assert (cfg.prefill_policy, cfg.api_key) == ("least_load", "k")


def info(wid, role, load=None):
    return rpb.WorkerInfo(worker_id=wid, role=role, address=f"{wid}:1", model_id="m",
                          load=load or rpb.LoadReport())


def test_pool_events_and_modes():
    pool = WorkerPool(mode="auto")
    with pytest.raises(NoRoute):
        pool.route()
    pool.apply("JOINED", info("c", rpb.WORKER_ROLE_COLOCATED))
    assert pool.route().prefill is None  # auto, no pair: colocated
    pool.apply("JOINED", info("p", rpb.WORKER_ROLE_PREFILL))
    assert pool.route().prefill is None  # a prefill alone is no pair
    pool.apply("JOINED", info("d", rpb.WORKER_ROLE_DECODE))
    r = pool.route()
    assert (r.prefill.worker_id, r.decode.worker_id) == ("p", "d")  # auto prefers PD
    pool.apply("UPDATED", info("d", rpb.WORKER_ROLE_DECODE, rpb.LoadReport(running=7)))
    assert pool.workers("DECODE")[0].load.running == 7
    pool.apply("EXPIRED", info("p", rpb.WORKER_ROLE_PREFILL))
    assert pool.route().decode.worker_id == "c"
    pd = WorkerPool(mode="pd")
    pd.apply("JOINED", info("c", rpb.WORKER_ROLE_COLOCATED))
    with pytest.raises(NoRoute, match="0 prefill, 0 decode"):
        pd.route()


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def reg(addr, role, port):
    return RegistryClient(addr, rpb.RegisterRequest(role=role, address=f"127.0.0.1:{port}",
                                                    model_id="m"),
                          load_fn=lambda: rpb.LoadReport(running=port % 7))


def test_pool_follows_a_real_registry_through_restart():
    server, port = create_registry("127.0.0.1:0", RegistryConfig(heartbeat_interval=0.2,
                                                                 heartbeat_max_failure=3))
    addr = f"127.0.0.1:{port}"
    pool = WorkerPool(addr, reconnect_s=0.1)
    # the pool follows the registry on an event loop (the gateway's); here, a thread's
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    loop.call_soon_threadsafe(pool.start)
    try:
        a = reg(addr, rpb.WORKER_ROLE_PREFILL, 7001)
        b = reg(addr, rpb.WORKER_ROLE_DECODE, 7003)
        a.start(), b.start()
        wait_for(lambda: len(pool.workers()) == 2)
        wait_for(lambda: pool.workers("DECODE")[0].load.running == 7003 % 7)  # UPDATED
        a.close()  # LEFT
        wait_for(lambda: [w.role for w in pool.workers()] == ["DECODE"])
        server.stop(0)  # the registry dies; the worker re-registers under a new id
        old_id = b.worker_id
        server, _ = create_registry(addr, RegistryConfig(heartbeat_interval=0.2,
                                                         heartbeat_max_failure=3))
        wait_for(lambda: b.worker_id != old_id)
        wait_for(lambda: [w.worker_id for w in pool.workers()] == [b.worker_id])
        b.close(deregister=False)  # killed: EXPIRED after one lease
        wait_for(lambda: pool.workers() == [], timeout=5)
    finally:
        loop.call_soon_threadsafe(pool.close)
        loop.call_soon_threadsafe(loop.stop)
        server.stop(0)


def test_transcoder_builds_exactly_the_annotated_routes():
    service = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]
    assert [(r.verb, r.path, r.method.name) for r in http_routes(service)] == [
        ("POST", "/v1/chat/completions", "ChatCompletions"),
        ("POST", "/v1/completions", "Completions"),
        ("GET", "/v1/models", "ListModels"),
        ("GET", "/health", "Health")]
    app = build_app(object.__new__(type("S", (), {n: None for n in (
        "ChatCompletions", "Completions", "ListModels", "Health")})), [service])
    got = {(r.method, r.resource.canonical) for r in app.router.routes()}
    # aiohttp adds HEAD for every GET
    assert got - {("HEAD", "/v1/models"), ("HEAD", "/health")} == {
        ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
        ("GET", "/v1/models"), ("GET", "/health")}


def test_warm_up_connects_to_the_workers_the_registry_lists():
    """A gateway process opens its worker channels before it says it listens, so no
    first request pays for a connection (dev CPU, 4 processes: the first request per
    process 55-64 ms, ~5 ms less than without); a pool that never synced is left after
    `timeout`, with nothing connected."""
    from types import SimpleNamespace

    import grpc

    from pdmesh.services.gateway.dispatch import Dispatcher

    async def main():
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            synced, addr = threading.Event(), f"127.0.0.1:{port}"
            pool = SimpleNamespace(breakers=SimpleNamespace(metrics=None), synced=synced,
                                   workers=lambda: [SimpleNamespace(address=addr)] * 2)
            d = Dispatcher(pool, SimpleNamespace(name="default"))
            t = time.monotonic()
            early = await d.warm_up(timeout=0.2), time.monotonic() - t, dict(d.legs._channels)
            synced.set()
            ready = await d.warm_up(timeout=10)
            state = d.legs._channels[addr].get_state()
            await d.close()
            return early, ready, state
        finally:
            await server.stop(0)
    (none, waited, channels), ready, state = asyncio.run(main())
    assert none == 0 and 0.15 < waited < 2 and not channels
    assert ready == 1 and state == grpc.ChannelConnectivity.READY
