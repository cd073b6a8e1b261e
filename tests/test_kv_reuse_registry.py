"""Decode-side reuse announced in the registry (KvReuse in RegisterRequest/WorkerInfo):
a decode worker started with --no-decode-prefix-cache is seen through the real
registry, by the gateway's own WorkerPool, as one that does not reuse adopted KV, so
per-request disaggregation's cost model counts a remote prefill's whole prompt as
sent. Real processes (a registry and a decode worker; no request runs). What a default
worker announces: the engine's rule, unit-tested on `kv_reuse`."""
from __future__ import annotations

import grpc
import pytest

from mesh_procs import start_decode, start_registry, terminate
from pdmesh.config import EngineConfig
from pdmesh.services.common.worker import kv_reuse
from pdmesh.services.gateway.pd_cost import CostModel
from pdmesh.services.gateway.pd_mode import PdModeDecider
from pdmesh.services.gateway.pool import WorkerPool
from pdmesh.v1 import registry_pb2 as rpb
from pdmesh.v1 import registry_pb2_grpc as rgrpc

KV = ("--kv-cache-bytes", str(24 << 20))


def test_kv_reuse_follows_the_engines_rule():
    both = kv_reuse(EngineConfig(), "decode")
    assert (both.prefix_cache, both.adopted_kv) == (True, True)
    off = kv_reuse(EngineConfig(decode_prefix_cache=False), "decode")
    assert (off.prefix_cache, off.adopted_kv) == (True, False)
    none = kv_reuse(EngineConfig(prefix_cache=False), "decode")
    assert (none.prefix_cache, none.adopted_kv) == (False, False)
    ref = kv_reuse(EngineConfig(numerics="reference"), "decode")  # no cache then
    assert (ref.prefix_cache, ref.adopted_kv) == (False, False)
    for role in ("prefill", "colocated"):  # only a decode worker adopts KV
        r = kv_reuse(EngineConfig(), role)
        assert (r.prefix_cache, r.adopted_kv) == (True, False)


@pytest.fixture(scope="module")
def decode_off():
    """The registry's entry (ListWorkers) of a decode started with
    --no-decode-prefix-cache."""
    reg, reg_addr = start_registry(0.3, 3)
    procs = [reg]
    try:
        proc, addr = start_decode(reg_addr, *KV, "--no-decode-prefix-cache")
        procs.append(proc)
        stub = rgrpc.RegistryStub(grpc.insecure_channel(reg_addr))
        workers = stub.ListWorkers(rpb.ListWorkersRequest(), timeout=10).workers
        yield next(w for w in workers if w.address == addr)
    finally:
        for p in procs[::-1]:
            terminate(p)


def test_registry_entry_says_the_decode_does_not_reuse_adopted_kv(decode_off):
    assert decode_off.HasField("kv_reuse")
    assert (decode_off.kv_reuse.prefix_cache, decode_off.kv_reuse.adopted_kv) == (True, False)


def transfer_tokens_of_turn2(info: rpb.WorkerInfo) -> int:
    """The gateway's pool fed `info` (as its registry Watch would), a prefill beside it:
    the KV tokens a remote prefill of turn 2 would send, turn 1 having gone remote."""
    pool = WorkerPool(mode="auto", pd_mode=PdModeDecider("always", CostModel()))
    pool.apply("JOINED", rpb.WorkerInfo(worker_id="p0", role=rpb.WORKER_ROLE_PREFILL,
                                        address="p0:1", model_id=info.model_id))
    pool.apply("JOINED", info)
    decode = next(w for w in pool.workers() if w.role == "DECODE")
    prefill = next(w for w in pool.workers() if w.role == "PREFILL")
    prompt, detail = list(range(320)), [("prefill.match_rate", 0.0)]
    pool.pd_mode.choose(prefill, decode, prompt, detail).ended()
    turn2 = pool.pd_mode.choose(prefill, decode, prompt + list(range(500, 532)), detail)
    return turn2.situation.transfer_tokens


def test_gateway_cost_model_counts_the_whole_prompt_as_sent(decode_off):
    assert transfer_tokens_of_turn2(decode_off) == 352
    older = rpb.WorkerInfo()  # the same entry from a worker older than KvReuse
    older.CopyFrom(decode_off)
    older.ClearField("kv_reuse")
    assert transfer_tokens_of_turn2(older) == 32  # assumed to reuse: only turn 2's pages
