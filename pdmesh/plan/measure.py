"""Measurements of the ratio method against a running mesh (DESIGN.md, "Why PD
disaggregation"), through the gateway's OpenAI API (pdmesh.bench's load generator) and
the workers' gRPC (Registry.ListWorkers, Decode.SlowDown / Decode.Stats).

- prefill capacity: output length 1, a concurrency sweep; each point's req/s and TTFT.
- decode capacity: SlowDown every decode worker, send batch·D long requests, poll
  Decode.Stats until each decode runs `batch` of them, release (SlowDown 0); the decode
  step time is read from the token streams after the release.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace

import numpy as np

from pdmesh import auth
from pdmesh.bench.loadgen import ClientConfig, run_fixed
from pdmesh.bench.metrics import RequestRecord, RunSummary
from pdmesh.bench.workload import Workload, WorkloadSpec
from pdmesh.plan.ratio import DecodePoint
from pdmesh.v1 import decode_pb2, decode_pb2_grpc, registry_pb2, registry_pb2_grpc


@dataclass(frozen=True)
class MeshInfo:
    """What the registry says about the mesh's workers."""

    prefill: list[str]  # gRPC addresses
    decode: list[str]
    kv_tokens: int  # KV pool of one decode worker, tokens
    kv_bytes_per_token: float
    max_running: int  # one decode worker's max_running_requests


def discover(registry: str, timeout: float = 10.0) -> MeshInfo:
    """ListWorkers on the registry; ValueError when there is no prefill or decode worker."""
    with auth.insecure_channel(registry) as ch:
        resp = registry_pb2_grpc.RegistryStub(ch).ListWorkers(
            registry_pb2.ListWorkersRequest(), timeout=timeout)
    pre = [w for w in resp.workers if w.role == registry_pb2.WORKER_ROLE_PREFILL]
    dec = [w for w in resp.workers if w.role == registry_pb2.WORKER_ROLE_DECODE]
    if not pre or not dec:
        raise ValueError(f"registry {registry} lists {len(pre)} prefill and {len(dec)} decode "
                         "workers; plan needs a PD mesh with at least one of each")
    lay = dec[0].kv_layout
    return MeshInfo([w.address for w in pre], [w.address for w in dec],
                    kv_tokens=lay.num_pages * lay.page_size,
                    kv_bytes_per_token=lay.bytes_per_page / max(1, lay.page_size),
                    max_running=dec[0].capacity.max_running_requests)


def measure_prefill(cfg: ClientConfig, spec: WorkloadSpec, concurrencies: list[int],
                    per_client: int, workload: Workload | None = None) -> list[RunSummary]:
    """Output length 1 at each concurrency (number = per_client · concurrency)."""
    wl = Workload.load(replace(spec, output_len=(1, 1))) if workload is None else \
        Workload(replace(spec, output_len=(1, 1)), workload.tokenizer)
    runs = []
    for c in concurrencies:
        summary, _ = asyncio.run(run_fixed(cfg, wl, c, per_client * c, label="prefill",
                                           warmup_requests=1 if not runs else 0,
                                           progress=False))
        if summary.failed:
            raise RuntimeError(f"prefill sweep c={c}: {summary.failed} requests failed: "
                               f"{summary.errors}")
        runs.append(summary)
    return runs


class _Decodes:
    """SlowDown / Stats over every decode worker's gRPC."""

    def __init__(self, addresses: list[str]) -> None:
        self.channels = [auth.insecure_channel(a) for a in addresses]
        self.stubs = [decode_pb2_grpc.DecodeStub(c) for c in self.channels]

    def slow_down(self, seconds: float) -> None:
        for s in self.stubs:
            s.SlowDown(decode_pb2.SlowDownRequest(forward_sleep_time=seconds), timeout=10)

    def running(self) -> list[int]:
        return [s.Stats(decode_pb2.StatsRequest(), timeout=10).running for s in self.stubs]

    def close(self) -> None:
        for c in self.channels:
            c.close()


def _chunk_times(rec: RequestRecord) -> np.ndarray:
    """Absolute arrival times of a request's content chunks."""
    return rec.start + rec.ttft + np.concatenate([[0.0], np.cumsum(rec.itl)])


def step_time_after(records: list[RequestRecord], t_release: float) -> float:
    """Median over requests of (end - t_release) / tokens generated after t_release.

    Before the release each (slow) step's token arrives as its own chunk, so the chunks
    up to t_release count the tokens generated before it."""
    steps = []
    for r in records:
        if not r.ok:
            continue
        before = int(np.sum(_chunk_times(r) <= t_release))
        left = r.output_tokens - before
        if left >= 2:
            steps.append((r.end - t_release) / left)
    if not steps:
        raise RuntimeError("no request was still decoding after the release; use a longer "
                           "--decode-output-len or a longer --decode-sleep")
    return float(np.median(steps))


async def _decode_point(cfg: ClientConfig, wl: Workload, decodes: _Decodes, batch: int,
                        sleep: float, fill_timeout: float) -> DecodePoint:
    n = batch * len(decodes.stubs)
    decodes.slow_down(sleep)
    task = asyncio.create_task(run_fixed(cfg, wl, n, n, label="decode", progress=False))
    deadline, seen = time.monotonic() + fill_timeout, [0]
    try:
        while time.monotonic() < deadline and not task.done():
            seen = await asyncio.to_thread(decodes.running)
            if min(seen) >= batch:
                break
            await asyncio.sleep(0.05)
    finally:
        t_release = time.perf_counter()
        decodes.slow_down(0.0)
    summary, records = await task
    if summary.failed:
        raise RuntimeError(f"decode batch {batch}: {summary.failed} requests failed: "
                           f"{summary.errors}")
    if min(seen) < batch:
        raise RuntimeError(f"decode batch {batch}: the running batch reached only {seen} "
                           f"within {fill_timeout:g} s (KV pool or max running requests too "
                           "small, or prefill too slow: raise --decode-fill-timeout)")
    # the step that was sleeping at release still ends up to `sleep` later
    step = step_time_after(records, t_release + sleep)
    return DecodePoint(batch=min(seen), step_s=step, output_len=wl.spec.output_len[1])


def measure_decode(cfg: ClientConfig, spec: WorkloadSpec, decode_addrs: list[str],
                   batches: list[int], output_len: int, sleep: float = 1.0,
                   fill_timeout: float = 120.0, workload: Workload | None = None
                   ) -> list[DecodePoint]:
    """One DecodePoint per batch size (each decode worker filled to `batch`, released)."""
    spec = replace(spec, output_len=(output_len, output_len))
    wl = Workload(spec, workload.tokenizer) if workload else Workload.load(spec)
    decodes = _Decodes(decode_addrs)
    try:
        return [asyncio.run(_decode_point(cfg, wl, decodes, b, sleep, fill_timeout))
                for b in batches]
    finally:
        decodes.slow_down(0.0)
        decodes.close()
