"""Prefill and decode workers end to end: real processes, real gRPC, real Mooncake tcp on
loopback, called exactly as the gateway calls them (Generate and Prefill concurrently)."""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from mesh_procs import (kill9, metric, start_decode, start_prefill, start_registry, terminate,
                        wait_until)
from pdmesh.v1 import common_pb2 as cpb
from pdmesh.v1 import decode_pb2 as dpb
from pdmesh.v1 import decode_pb2_grpc as dgrpc
from pdmesh.v1 import prefill_pb2 as ppb
from pdmesh.v1 import prefill_pb2_grpc as pgrpc
from pdmesh.v1 import registry_pb2 as rpb
from pdmesh.v1 import registry_pb2_grpc as rgrpc

INTERVAL, MAX_FAILURE = 0.3, 3
LEASE = INTERVAL * MAX_FAILURE
KV = ("--kv-cache-bytes", str(48 << 20))  # ~68 pages of 16 tokens
WAITING = ("--waiting-timeout", "6")  # decode: KV must arrive within 6 s
PROMPT = [1, 504, 3575, 314, 253, 2113, 28, 940, 3458, 30, 198, 504, 1345, 282, 260, 2371,
          314, 1345, 17, 198]
GREEDY = cpb.SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
# the workers' device (PDMESH_DEVICE, inherited): on a GPU the same tests run the pair's
# KV over CUDA IPC (one GPU, two processes) instead of shared memory
DEVICE = os.environ.get("PDMESH_DEVICE", "cpu")
SAME_HOST_PATH = "ipc" if DEVICE.startswith("cuda") else "shm"


class Mesh:
    """The module's processes and stubs; `prefill` and `decode` may be replaced by
    restarted ones."""

    def __init__(self) -> None:
        self.registry, self.registry_addr = start_registry(INTERVAL, MAX_FAILURE)
        with ThreadPoolExecutor(3) as ex:
            p = ex.submit(start_prefill, self.registry_addr, *KV, "--bootstrap-timeout", "5")
            d = ex.submit(start_decode, self.registry_addr, *KV, *WAITING)
            c = ex.submit(start_decode, self.registry_addr, *KV, "--role", "colocated")
            (self.prefill, self.p_addr), (self.decode, self.d_addr) = p.result(), d.result()
            self.colocated, self.c_addr = c.result()
        self.reg = rgrpc.RegistryStub(grpc.insecure_channel(self.registry_addr))
        self.d = dgrpc.DecodeStub(grpc.insecure_channel(self.d_addr))
        self.c = dgrpc.DecodeStub(grpc.insecure_channel(self.c_addr))
        self.p = pgrpc.PrefillStub(grpc.insecure_channel(self.p_addr))

    def set_prefill(self, proc, addr: str) -> None:
        self.prefill, self.p_addr = proc, addr
        self.p = pgrpc.PrefillStub(grpc.insecure_channel(addr))

    def set_decode(self, proc, addr: str) -> None:
        self.decode, self.d_addr = proc, addr
        self.d = dgrpc.DecodeStub(grpc.insecure_channel(addr))

    def procs(self):
        return [self.prefill, self.decode, self.colocated, self.registry]


@pytest.fixture(scope="module")
def mesh():
    m = Mesh()
    yield m
    for proc in m.procs():
        terminate(proc)


@pytest.fixture(scope="module")
def expected(default_model):
    """Offline greedy output of the runtime alone for PROMPT, on the workers' device."""
    from pdmesh import Engine, SamplingParams

    engine = Engine(loaded=default_model, num_pages=16, device=DEVICE)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    return engine.generate(prompt_token_ids=PROMPT, params=params)[0].token_ids


def run_pd(mesh: Mesh, ids=PROMPT, sampling=GREEDY, timeout: float = 60):
    """Generate on D and Prefill on P concurrently; returns (chunks, PrefillResponse)."""
    room = random.getrandbits(63)
    with ThreadPoolExecutor(1) as ex:
        pre = ex.submit(mesh.p.Prefill, ppb.PrefillRequest(
            room=room, decode_address=mesh.d_addr, token_ids=ids, sampling_params=sampling),
            timeout=timeout)
        chunks = list(mesh.d.Generate(dpb.DecodeRequest(
            room=room, prefill_address=mesh.p_addr, token_ids=ids, sampling_params=sampling),
            timeout=timeout))
        return chunks, pre.result()


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def all_free(stub) -> bool:
    s = stub.Stats(dpb.StatsRequest(), timeout=5)
    return s.free_pages == s.total_pages and s.quarantined_pages == 0 and s.used_pages == 0


def prefill_all_free(mesh: Mesh) -> bool:
    """The prefill's free pages (its heartbeat load report) are back to its pool size."""
    workers = mesh.reg.ListWorkers(rpb.ListWorkersRequest(role=rpb.WORKER_ROLE_PREFILL)).workers
    w = [w for w in workers if w.address == mesh.p_addr]
    return bool(w) and w[0].load.free_kv_pages == w[0].capacity.num_pages


def test_pd_greedy_equals_offline(mesh, expected):
    chunks, pre = run_pd(mesh)
    assert tokens(chunks) == expected
    last = chunks[-1]
    assert last.finish_reason == cpb.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(PROMPT), 16)
    assert pre.timings.prefill_s > 0 and pre.timings.transfer_s > 0
    # the pair is on one host: the KV went by shared memory (CUDA IPC on a GPU), so this
    # module's kill -9 and timeout tests run on that path (Mooncake's: tests/test_serve.py,
    # --kv-path)
    assert metric(mesh.prefill.metrics_url, "pdmesh_kv_transfer_bytes_total",
                  path=SAME_HOST_PATH) > 0
    assert wait_until(lambda: all_free(mesh.d), 5)
    assert wait_until(lambda: prefill_all_free(mesh), 5)


def test_colocated_equals_offline(mesh, expected):
    chunks = list(mesh.c.Generate(dpb.DecodeRequest(room=random.getrandbits(63),
                                                    token_ids=PROMPT, sampling_params=GREEDY)))
    assert tokens(chunks) == expected
    assert wait_until(lambda: all_free(mesh.c), 5)
    workers = mesh.reg.ListWorkers(rpb.ListWorkersRequest()).workers
    roles = {w.address: w.role for w in workers}
    assert roles[mesh.c_addr] == rpb.WORKER_ROLE_COLOCATED
    assert roles[mesh.d_addr] == rpb.WORKER_ROLE_DECODE


def test_stream_cancel_frees_pages_on_both_sides(mesh):
    mesh.d.SlowDown(dpb.SlowDownRequest(forward_sleep_time=0.1))
    try:
        room = random.getrandbits(63)
        long = cpb.SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        threading.Thread(target=lambda: _swallow(mesh.p.Prefill, ppb.PrefillRequest(
            room=room, decode_address=mesh.d_addr, token_ids=PROMPT, sampling_params=long)),
            daemon=True).start()
        stream = mesh.d.Generate(dpb.DecodeRequest(room=room, prefill_address=mesh.p_addr,
                                                   token_ids=PROMPT, sampling_params=long))
        got = [next(stream), next(stream)]
        assert tokens(got)
        s = mesh.d.Stats(dpb.StatsRequest())
        assert s.used_pages > 0 and s.forward_sleep_time == pytest.approx(0.1)
        stream.cancel()
    finally:
        mesh.d.SlowDown(dpb.SlowDownRequest(forward_sleep_time=0))
    assert wait_until(lambda: all_free(mesh.d), 5)
    assert wait_until(lambda: prefill_all_free(mesh), 5)


def _swallow(fn, *args):
    try:
        fn(*args)
    except grpc.RpcError:
        pass


@pytest.mark.parametrize("ids, sampling, reason", [
    ([], GREEDY, "token_ids is empty"),
    ([1, 10**7], GREEDY, "out of range"),
    (PROMPT, cpb.SamplingParams(temperature=-1), "temperature"),
    (PROMPT, cpb.SamplingParams(top_p=2.0), "top_p"),
    (PROMPT, cpb.SamplingParams(max_tokens=10**6), "maximum context length"),
])
def test_bad_input_is_invalid_argument(mesh, ids, sampling, reason):
    calls = [
        lambda: list(mesh.d.Generate(dpb.DecodeRequest(
            room=random.getrandbits(63), prefill_address=mesh.p_addr, token_ids=ids,
            sampling_params=sampling), timeout=10)),
        lambda: list(mesh.c.Generate(dpb.DecodeRequest(
            room=random.getrandbits(63), token_ids=ids, sampling_params=sampling), timeout=10)),
        lambda: mesh.p.Prefill(ppb.PrefillRequest(
            room=random.getrandbits(63), decode_address=mesh.d_addr, token_ids=ids,
            sampling_params=sampling), timeout=10),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason in e.value.details()
    assert all_free(mesh.d) and all_free(mesh.c)


def test_transfer_layout_mismatch_and_unknown_abort(mesh):
    with pytest.raises(grpc.RpcError) as e:
        mesh.p.Transfer(ppb.TransferRequest(
            room=random.getrandbits(63), dst_session_id="127.0.0.1:1", dst_page_ids=[0],
            model_id="default", dtype="float32", page_size=32, num_layers=30,
            num_kv_heads=3, head_dim=64, bytes_per_page=1474560), timeout=5)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "page size: source 16 != destination 32" in e.value.details()
    assert not mesh.p.Abort(ppb.PrefillAbortRequest(room=random.getrandbits(63))).aborted
    assert not mesh.d.Abort(dpb.DecodeAbortRequest(room=random.getrandbits(63))).aborted


def test_bootstrap_timeout_frees_prefill_kv(mesh):
    url = mesh.prefill.metrics_url
    timeouts = metric(url, "pdmesh_prefill_bootstrap_timeouts_total")
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:  # no decode worker ever sends Transfer
        mesh.p.Prefill(ppb.PrefillRequest(room=random.getrandbits(63), decode_address=mesh.d_addr,
                                          token_ids=PROMPT, sampling_params=GREEDY), timeout=30)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "bootstrap timeout" in e.value.details()
    assert 4.5 < time.monotonic() - t0 < 10
    assert wait_until(lambda: prefill_all_free(mesh), 5)
    assert metric(url, "pdmesh_prefill_bootstrap_timeouts_total") == timeouts + 1
    assert metric(url, "pdmesh_worker_rpcs_total", method="Prefill",
                  code="DEADLINE_EXCEEDED") >= 1


def test_waiting_timeout_fails_stream_and_counts(mesh):
    """Generate alone, no Prefill for the room: the KV never comes; the stream fails
    DEADLINE_EXCEEDED after the waiting timeout, pages come back, the metric counts it."""
    url = mesh.decode.metrics_url
    timeouts = metric(url, "pdmesh_decode_waiting_timeouts_total")
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        list(mesh.d.Generate(dpb.DecodeRequest(room=random.getrandbits(63),
                                               prefill_address=mesh.p_addr,
                                               token_ids=PROMPT, sampling_params=GREEDY)))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "waiting timeout" in e.value.details()
    assert 5.5 < time.monotonic() - t0 < 12
    assert metric(url, "pdmesh_decode_waiting_timeouts_total") == timeouts + 1
    assert wait_until(lambda: all_free(mesh.d) and prefill_all_free(mesh), 10)


def test_prefill_dies_while_decode_waits_for_kv(mesh, expected):
    """Generate alone: D holds pages and waits in Transfer. The prefill hangs (SIGSTOP):
    the stream fails within one lease via the registry, not after 300 s; then kill -9:
    every decode page comes back; a restarted prefill takes traffic again."""
    stream = mesh.d.Generate(dpb.DecodeRequest(room=random.getrandbits(63),
                                               prefill_address=mesh.p_addr,
                                               token_ids=PROMPT, sampling_params=GREEDY))
    assert wait_until(lambda: mesh.d.Stats(dpb.StatsRequest()).used_pages > 0, 10)
    t0 = time.monotonic()
    reg_url = mesh.registry.metrics_url
    expiries = metric(reg_url, "pdmesh_registry_expiries_total")
    missed = metric(reg_url, "pdmesh_registry_missed_heartbeats_total")
    mesh.prefill.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(grpc.RpcError) as e:
            list(stream)
        elapsed = time.monotonic() - t0
    finally:
        kill9(mesh.prefill)
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)
    assert "prefill worker" in e.value.details() and "expired" in e.value.details()
    assert elapsed < LEASE + 2.0
    assert wait_until(lambda: all_free(mesh.d), 5)
    assert metric(reg_url, "pdmesh_registry_expiries_total") == expiries + 1
    assert metric(reg_url, "pdmesh_registry_missed_heartbeats_total") >= missed + MAX_FAILURE
    mesh.set_prefill(*start_prefill(mesh.registry_addr, *KV))
    assert wait_until(lambda: prefill_all_free(mesh), 10)
    chunks, _ = run_pd(mesh)
    assert tokens(chunks) == expected


def test_decode_dies_while_prefill_holds_kv(mesh, expected):
    """Prefill alone for a room bound for D: P computes the KV and keeps it for D's
    Transfer. D hangs (SIGSTOP) before it sends one: P frees the KV and fails Prefill
    within one lease via the registry, not after the bootstrap timeout; then kill -9;
    a restarted decode takes traffic again."""
    before = mesh.p.Stats(ppb.PrefillStatsRequest(), timeout=5)
    assert before.free_pages == before.total_pages and before.rooms == 0
    with ThreadPoolExecutor(1) as ex:
        pre = ex.submit(mesh.p.Prefill, ppb.PrefillRequest(
            room=random.getrandbits(63), decode_address=mesh.d_addr, token_ids=PROMPT,
            sampling_params=GREEDY), timeout=30)
        assert wait_until(lambda: mesh.p.Stats(ppb.PrefillStatsRequest()).free_pages
                          < before.total_pages, 10)  # P holds the room's KV for D
        assert wait_until(lambda: not prefill_all_free(mesh), 5)  # ... and reports it
        t0 = time.monotonic()
        mesh.decode.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(grpc.RpcError) as e:
                pre.result()
            elapsed = time.monotonic() - t0
        finally:
            kill9(mesh.decode)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"decode worker {mesh.d_addr} expired" in e.value.details()
    assert elapsed < LEASE + 2.0  # the bootstrap timeout here is 5 s, the default 300 s
    assert wait_until(lambda: prefill_all_free(mesh), 5)  # the registry's load report
    after = mesh.p.Stats(ppb.PrefillStatsRequest(), timeout=5)
    assert after.free_pages == after.total_pages and after.rooms == 0
    assert after.failed_requests == before.failed_requests + 1
    mesh.set_decode(*start_decode(mesh.registry_addr, *KV, *WAITING))
    chunks, _ = run_pd(mesh)
    assert tokens(chunks) == expected
    assert mesh.d.Stats(dpb.StatsRequest()).finished_requests == 1
    assert mesh.p.Stats(ppb.PrefillStatsRequest()).transferred_requests == \
        after.transferred_requests + 1
    assert wait_until(lambda: all_free(mesh.d), 5)
    assert wait_until(lambda: prefill_all_free(mesh), 5)


def test_long_step_does_not_cost_the_lease(mesh):
    """An engine loop busy far longer than the lease (SlowDown 3 s per step here; a long
    CPU prefill in production) must not expire a healthy worker: its heartbeat load report
    and Stats answer from the last reading instead of waiting for the step."""
    reg_url = mesh.registry.metrics_url
    expiries = metric(reg_url, "pdmesh_registry_expiries_total")
    mesh.c.SlowDown(dpb.SlowDownRequest(forward_sleep_time=3.0))
    try:
        params = cpb.SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        stream = mesh.c.Generate(dpb.DecodeRequest(room=random.getrandbits(63),
                                                   token_ids=PROMPT, sampling_params=params))
        first = next(stream)  # the loop is now sleeping 3 s after every step
        t0 = time.monotonic()
        mesh.c.Stats(dpb.StatsRequest(), timeout=5)
        assert time.monotonic() - t0 < 1.5
        rest = list(stream)  # ~6 s more: more than six leases
        assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 3
    finally:
        mesh.c.SlowDown(dpb.SlowDownRequest(forward_sleep_time=0))
    workers = mesh.reg.ListWorkers(rpb.ListWorkersRequest()).workers
    assert mesh.c_addr in [w.address for w in workers]
    assert metric(reg_url, "pdmesh_registry_expiries_total") == expiries


def test_sigterm_drains_in_flight_then_deregisters(mesh):
    """Graceful shutdown: a stream in flight at SIGTERM still completes; the worker then
    leaves the registry (deregistered, not expired) and exits 0."""
    stream = mesh.c.Generate(dpb.DecodeRequest(
        room=random.getrandbits(63), token_ids=PROMPT,
        sampling_params=cpb.SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)))
    first = next(stream)
    mesh.colocated.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert len(tokens([first, *rest])) == 48
    assert rest[-1].finish_reason == cpb.FINISH_REASON_LENGTH
    assert mesh.colocated.wait(15) == 0
    addrs = [w.address for w in mesh.reg.ListWorkers(rpb.ListWorkersRequest()).workers]
    assert mesh.c_addr not in addrs

