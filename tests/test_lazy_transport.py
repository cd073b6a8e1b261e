"""The transfer engine on demand (pdmesh.transfer.lazy): no port until a peer needs one.

Real parts: Mooncake over tcp loopback and shared-memory pools in this process; the
decode's EngineGate is driven with registry WorkerInfo messages and a recording kv_op.
"""
from __future__ import annotations

import asyncio
import logging

import psutil
import pytest
import torch

from pdmesh.services.common.kv_engine import EngineGate
from pdmesh.transfer import make_kv_transport, shm
from pdmesh.transfer.base import TransferError
from pdmesh.transfer.ipc_uri import pool_gpu
from pdmesh.transfer.lazy import engine_session, engine_started, needs_engine, peer_key
from pdmesh.transfer.route import Destination, Router
from pdmesh.v1 import registry_pb2 as rpb

PAGES, BPP = 8, 256


def ports() -> set[int]:
    return {c.laddr.port for c in psutil.Process().net_connections("tcp")
            if c.status == psutil.CONN_LISTEN}


def lazy(pool):
    t, base, mode = make_kv_transport("mooncake", pool, "auto", lazy=True,
                                      hostname="127.0.0.1")
    assert (base, mode) == (pool.data_ptr(), "host")
    return t


def pool(fill: int = 0):
    p = shm.alloc_pool((PAGES, BPP), torch.uint8)
    p.fill_(fill)
    return p


def test_session_ids_name_the_peer_whether_started_or_not():
    assert not engine_started("10.0.0.5:0#ab") and engine_started("10.0.0.5:15123#ab")
    assert engine_started("10.0.0.5:15123")  # an eager engine's plain id
    assert peer_key("10.0.0.5:0#ab") == peer_key("10.0.0.5:15123#ab") == "ab"
    assert peer_key("10.0.0.5:15123") == "10.0.0.5:15123"
    assert engine_session("[::1]:15123#ab") == "[::1]:15123"


def test_no_port_until_the_first_write_then_bytes_land():
    src_pool, dst_pool = pool(7), pool(0)
    open_before = ports()
    src, dst = lazy(src_pool), lazy(dst_pool)
    try:
        assert ports() == open_before and not src.started and not dst.started
        sid = dst.session_id
        assert sid.startswith("127.0.0.1:0#")
        with pytest.raises(TransferError, match="not started"):  # its engine is not up
            src.write_pages(sid, src_pool.data_ptr(), dst_pool.data_ptr(), BPP, [1], [2])
        assert not src.started  # ... and ours did not start for nothing
        session, base = dst.start("test")
        assert base == dst_pool.data_ptr() and peer_key(session) == peer_key(sid)
        assert len(ports() - open_before) == 2  # handshake and data port
        stats = src.write_pages(session, src_pool.data_ptr(), base, BPP, [1, 3], [2, 5])
        assert src.started and stats.bytes == 2 * BPP
        assert src.start_seconds is not None and src.start_seconds < 5
        print(f"engine start on first write: {src.start_seconds * 1e3:.1f} ms")
        assert dst_pool[2].eq(7).all() and dst_pool[5].eq(7).all() and dst_pool[0].eq(0).all()
        assert src.read_pages(session, base, BPP, [5]).eq(7).all()
    finally:
        src.close()
        dst.close()


def test_router_same_host_binds_shm_without_starting_the_engine(caplog):
    src_pool, dst_pool = pool(3), pool(0)
    src, dst = lazy(src_pool), lazy(dst_pool)
    open_before = ports()
    router = Router(src, src_pool.data_ptr(), src_pool, BPP, "auto", my_host="h")
    d = Destination(dst.session_id, dst_pool.data_ptr(), "h", (shm.export_pool(dst_pool),))
    try:
        assert router.write_pages(d, [0, 1], [4, 6]).path == "shm"
        assert dst_pool[4].eq(3).all() and ports() == open_before and not src.started
        # the decode starts its engine later (a prefill elsewhere): same route, same key
        started = Destination(dst.start()[0], d.kv_base, "h", d.local_endpoints)
        assert router.route_name(started) == "shm"
        router.forget(d.session_id)  # the registry still has the id published at start
        assert router.route_name(started) is None
        # another host: the engine route, ours started by the write
        far = Destination(started.session_id, d.kv_base, "elsewhere", d.local_endpoints)
        assert router.write_pages(far, [2], [7]).path == "mooncake" and src.started
        assert dst_pool[7].eq(3).all()
        # both engines run now: a same-host pair binding anew probes both paths again
        router.forget(far.session_id)
        with caplog.at_level(logging.INFO, logger="pdmesh.transfer.route"):
            assert router.write_pages(started, [0], [1]).path == "shm"
        bound = [r.message for r in caplog.records if "KV path to" in r.message]
        assert "mooncake" in bound[-1] and " ms" in bound[-1], bound
    finally:
        router.close()
        src.close()
        dst.close()


SHM = ["shm:/proc/1/fd/3?bytes=8"]


def ipc_uri(gpu: str) -> str:
    """A well-formed ipc: URI as cuda_ipc writes it, on GPU `gpu` (only the uuid matters
    here; pdmesh.transfer.ipc_uri checks every field)."""
    from pdmesh.transfer import ipc_uri as codec

    filler = {bytes: b"x", bool: False, str: "p", int: 8}
    fields = {k: filler[kind] for k, kind in codec.FIELDS.items()}
    return codec.encode_uri(dict(fields, uuid=gpu, v=codec.VERSION, offset=0, nbytes=8))


def test_a_decode_needs_its_engine_unless_the_prefill_writes_locally():
    assert not needs_engine("h", SHM, "h", SHM)
    assert needs_engine("h", SHM, "g", SHM)  # another host
    assert needs_engine("h", SHM, None, SHM)  # unknown prefill
    assert needs_engine("h", SHM, "h", [])  # a TP prefill: no same-host path
    assert needs_engine("h", [], "h", SHM)
    # GPU pools: CUDA IPC only within one GPU; two GPUs of a host go through the engine
    assert not needs_engine("h", [ipc_uri("GPU-a")], "h", [ipc_uri("GPU-a")])
    assert needs_engine("h", [ipc_uri("GPU-a")], "h", [ipc_uri("GPU-b")])
    assert needs_engine("h", [ipc_uri("GPU-a")], "h", SHM)  # different kinds
    assert needs_engine("h", ["ipc:%%%"], "h", ["ipc:%%%"])  # unreadable: no path assumed
    assert pool_gpu(ipc_uri("GPU-a")) == "GPU-a"


def info(address: str, host: str, local: list[str] | None = SHM) -> rpb.WorkerInfo:
    return rpb.WorkerInfo(address=address, transfer=rpb.TransferEndpoint(
        session_id="x:0#1", host_id=host, local_endpoints=local or []))


def test_engine_gate_starts_once_for_a_prefill_on_another_host():
    calls = []

    def kv_op(op, args):
        calls.append((op, args))
        return "127.0.0.1:15001#n", 4096

    gate = EngineGate(kv_op, "127.0.0.1:0#n", 1024, "h", SHM)
    gate.observe("JOINED", info("p1:1", "h"))
    gate.observe("JOINED", info("p2:1", "g"))

    async def run():
        assert await gate.endpoint("p1:1") == ("127.0.0.1:0#n", 1024)
        assert calls == []
        got = await asyncio.gather(gate.endpoint("p2:1"), gate.endpoint("p2:1"))
        assert got == [("127.0.0.1:15001#n", 4096)] * 2
        assert [op for op, _ in calls] == ["start_engine"]
        assert "another host" in calls[0][1][0]
        assert await gate.endpoint("p1:1") == ("127.0.0.1:15001#n", 4096)
    asyncio.run(run())


def test_engine_gate_unknown_or_departed_prefill_starts_the_engine():
    calls = []
    gate = EngineGate(lambda op, a: calls.append(a) or ("h:2#n", 1), "h:0#n", 1, "h", SHM)
    gate.observe("JOINED", info("p1:1", "h"))
    gate.observe("LEFT", info("p1:1", "h"))
    assert asyncio.run(gate.endpoint("p1:1")) == ("h:2#n", 1)
    assert "not in the registry" in calls[0][0]


def test_engine_gate_starts_for_a_prefill_on_another_gpu_of_this_host():
    calls = []
    gate = EngineGate(lambda op, a: calls.append(a) or ("h:2#n", 1), "h:0#n", 1, "h",
                      [ipc_uri("GPU-1")])
    gate.observe("JOINED", info("same:1", "h", [ipc_uri("GPU-1")]))
    gate.observe("JOINED", info("other:1", "h", [ipc_uri("GPU-0")]))
    assert asyncio.run(gate.endpoint("same:1")) == ("h:0#n", 1)
    assert calls == []
    assert asyncio.run(gate.endpoint("other:1")) == ("h:2#n", 1)
    assert "no same-host path opens" in calls[0][0]
