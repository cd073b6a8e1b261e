"""pdmesh.v1.Chaos: the fault table alone (no processes), then on an in-process registry
started with chaos on (guarded by the cluster token, off unless enabled)."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from pdmesh import auth
from pdmesh.config import RegistryConfig, registry_config_from_env, worker_config_from_env
from pdmesh.registry_client import RegistryClient
from pdmesh.services.common.chaos import Chaos, ChaosError
from pdmesh.v1 import chaos_pb2 as cpb
from pdmesh.v1 import chaos_pb2_grpc as cgrpc
from pdmesh.v1 import registry_pb2 as rpb
from pdmesh.v1 import registry_pb2_grpc as rgrpc

TOKEN = "chaos-test-token"
F, C = cpb.ChaosFault, cpb


class FakeEngine:
    def __init__(self) -> None:
        self.sleep = 0.02  # a SlowDown already in effect

    @property
    def stats(self):
        return type("S", (), {"forward_sleep_time": self.sleep})()

    async def slow_down(self, s: float) -> None:
        self.sleep = s


def kv(action, count=2, delay_s=0.0):
    return F(kv_write=C.KvWriteFault(action=action, count=count, delay_s=delay_s))


def test_off_unless_enabled():
    assert not worker_config_from_env(env={}).chaos
    assert worker_config_from_env(env={"PDMESH_CHAOS": "1"}).chaos
    assert not registry_config_from_env(env={}).chaos
    assert registry_config_from_env(env={"PDMESH_CHAOS": "true"}).chaos


def test_kv_write_faults_count_down():
    async def go():
        c = Chaos("prefill")
        assert await c.kv_write(1) is False  # nothing armed
        await c.inject(kv(C.KV_WRITE_ACTION_CORRUPT))
        assert c.state().kv_write_action == "CORRUPT" and c.state().kv_writes_armed == 2
        assert [await c.kv_write(r) for r in (1, 2, 3)] == [True, True, False]
        await c.inject(kv(C.KV_WRITE_ACTION_FAIL, count=1))
        with pytest.raises(ChaosError):
            await c.kv_write(4)
        assert await c.kv_write(5) is False
        await c.inject(kv(C.KV_WRITE_ACTION_DELAY, count=1, delay_s=0.2))
        t = time.monotonic()
        assert await c.kv_write(6) is False and time.monotonic() - t >= 0.19
        assert c.state().fired == 4
    asyncio.run(go())


def test_bad_faults_are_refused():
    async def go():
        c = Chaos("prefill", engine=None)
        c.methods = {"Prefill", "Transfer"}
        bad = [kv(0), kv(C.KV_WRITE_ACTION_FAIL, count=0), kv(C.KV_WRITE_ACTION_DELAY, 1, 61),
               F(rpc=C.RpcFault(method="Nope", action=C.RPC_ACTION_FAIL, count=1)),
               F(rpc=C.RpcFault(method="Prefill", action=C.RPC_ACTION_FAIL, count=1,
                                code="OK")),
               F(rpc=C.RpcFault(method="Prefill", action=C.RPC_ACTION_FAIL, count=1,
                                code="BOGUS")),
               F(heartbeat=C.HeartbeatFault(action=C.HEARTBEAT_ACTION_DROP, duration_s=-1)),
               F(heartbeat=C.HeartbeatFault(duration_s=1)), F()]
        for f in bad:
            with pytest.raises(ValueError):
                await c.inject(f)
        with pytest.raises(LookupError):  # no engine here
            await c.inject(F(engine=C.EngineFault(step_sleep_s=0.1, duration_s=1)))
        with pytest.raises(LookupError):  # a decode writes no KV
            await Chaos("decode").inject(kv(C.KV_WRITE_ACTION_FAIL))
    asyncio.run(go())


def test_rpc_faults_and_heartbeat_hold():
    async def go():
        c = Chaos("decode")
        c.methods = {"Generate"}
        await c.inject(F(rpc=C.RpcFault(method="Generate", action=C.RPC_ACTION_FAIL, count=2,
                                        code="INTERNAL")))
        assert dict(c.state().rpcs_armed) == {"Generate": 2}
        assert c.rpc_fault("Stats") is None
        assert c.rpc_fault("Generate")[2] == grpc.StatusCode.INTERNAL
        assert c.rpc_fault("Generate") is not None and c.rpc_fault("Generate") is None
        assert c.heartbeat_hold() is None
        await c.inject(F(heartbeat=C.HeartbeatFault(action=C.HEARTBEAT_ACTION_STALL,
                                                    duration_s=5)))
        what, left = c.heartbeat_hold()
        assert what == "stall" and 4 < left <= 5
        await c.clear()
        assert c.heartbeat_hold() is None and not c.state().rpcs_armed
    asyncio.run(go())


def test_engine_slowdown_restores_the_previous_sleep():
    async def go():
        eng = FakeEngine()
        c = Chaos("decode", engine=eng)
        await c.inject(F(engine=C.EngineFault(step_sleep_s=0.5, duration_s=0.1)))
        assert eng.sleep == 0.5 and c.state().engine_fault_left_s > 0
        await asyncio.sleep(0.2)
        assert eng.sleep == 0.02 and c.state().engine_fault_left_s == 0
        await c.inject(F(engine=C.EngineFault(step_sleep_s=0.3, duration_s=10)))
        await c.inject(F(engine=C.EngineFault(step_sleep_s=0.4, duration_s=10)))  # replaces
        await c.clear()
        assert eng.sleep == 0.02  # the SlowDown from before, not the first fault's
    asyncio.run(go())


def test_worker_heartbeat_drop_expires_it_then_it_registers_again():
    """A worker whose beats are dropped for longer than its lease is expired by the
    registry, then registers again by itself once they resume."""
    from pdmesh.services.bootstrap.server import create_server

    server, port = create_server("127.0.0.1:0", RegistryConfig(heartbeat_interval=0.1,
                                                               heartbeat_max_failure=2))
    addr = f"127.0.0.1:{port}"
    chaos = Chaos("prefill")
    try:
        client = RegistryClient(addr, rpb.RegisterRequest(
            role=rpb.WORKER_ROLE_PREFILL, address="127.0.0.1:1", model_id="m"))
        client.chaos = chaos
        client.start()
        first = client.worker_id
        asyncio.run(chaos.inject(F(heartbeat=C.HeartbeatFault(
            action=C.HEARTBEAT_ACTION_DROP, duration_s=0.6))))
        time.sleep(0.45)
        assert server.table.get(first) is None  # expired: lease 0.2 s
        deadline = time.monotonic() + 3
        while client.registrations < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.registrations == 2 and server.table.workers()[0].address == "127.0.0.1:1"
        client.close()
    finally:
        server.stop(0)


@pytest.fixture
def chaos_registry():
    from pdmesh.services.bootstrap.server import create_server

    auth.configure(TOKEN)
    server, port = create_server("127.0.0.1:0", RegistryConfig(
        heartbeat_interval=0.2, heartbeat_max_failure=2, chaos=True))
    yield server, f"127.0.0.1:{port}"
    server.stop(0)
    auth.configure(auth.PROCESS)


def test_registry_chaos_rpcs_need_the_token(chaos_registry):
    _, addr = chaos_registry
    with auth.insecure_channel(addr, token="wrong") as ch:
        with pytest.raises(grpc.RpcError) as e:
            cgrpc.ChaosStub(ch).State(cpb.ChaosStateRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with auth.insecure_channel(addr) as ch:
        s = cgrpc.ChaosStub(ch).State(cpb.ChaosStateRequest(), timeout=5)
        assert s.role == "registry" and s.pid > 0
        with pytest.raises(grpc.RpcError) as e:
            cgrpc.ChaosStub(ch).Inject(kv(C.KV_WRITE_ACTION_FAIL), timeout=5)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_registry_rpc_fault_then_heartbeat_drop(chaos_registry):
    server, addr = chaos_registry
    with auth.insecure_channel(addr) as ch:
        chaos, reg = cgrpc.ChaosStub(ch), rgrpc.RegistryStub(ch)
        chaos.Inject(F(rpc=C.RpcFault(method="ListWorkers", action=C.RPC_ACTION_FAIL,
                                      count=1)), timeout=5)
        with pytest.raises(grpc.RpcError) as e:
            reg.ListWorkers(rpb.ListWorkersRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "chaos" in e.value.details()
        reg.ListWorkers(rpb.ListWorkersRequest(), timeout=5)  # the next one is served
        chaos.Inject(F(rpc=C.RpcFault(method="ListWorkers", action=C.RPC_ACTION_DELAY,
                                      count=1, delay_s=0.3)), timeout=5)
        t = time.monotonic()
        reg.ListWorkers(rpb.ListWorkersRequest(), timeout=5)
        assert time.monotonic() - t >= 0.29
        with RegistryClient(addr, rpb.RegisterRequest(
                role=rpb.WORKER_ROLE_DECODE, address="127.0.0.1:2", model_id="m")) as client:
            chaos.Inject(F(heartbeat=C.HeartbeatFault(action=C.HEARTBEAT_ACTION_DROP,
                                                      duration_s=0.8)), timeout=5)
            time.sleep(0.7)  # beats are answered but renew nothing: the lease (0.4 s) ends
            assert server.table.get(client.worker_id) is None
            time.sleep(0.6)  # then the worker registers again by itself
            assert [w.address for w in server.table.workers()] == ["127.0.0.1:2"]
        assert chaos.State(cpb.ChaosStateRequest(), timeout=5).fired == 2
