"""256 concurrent streaming requests through `pdmesh serve` (the real openai client):
1P1D, 2P1D and colocated; at 1P1D also 256 gRPC Gateway.Generate streams at the same time. Every request completes with its own tokens, none fails, and
every worker's KV pages are back to total afterwards.

256 is four times the workers' default `max_running_requests` (64), and the pools are
small (~135 pages of 16 tokens), so requests wait in every queue the mesh has: the
decode's pre-allocation queue, the prefill's queue and its budget of rooms computed
ahead of their decode. The old sync servers (32 threads each) stalled at 32 here.
With `--engine-process` the same, the engine cores in child processes.
"""
from __future__ import annotations

import asyncio
import re
import signal

import pytest

from mesh_procs import (SERVE_TOKEN, child_pids, start_serve, thread_nices, wait_until,
                        worker_addresses)
from pdmesh import auth
from pdmesh.v1 import decode_pb2 as dpb
from pdmesh.v1 import decode_pb2_grpc as dgrpc
from pdmesh.v1 import prefill_pb2 as ppb
from pdmesh.v1 import prefill_pb2_grpc as pgrpc

N = 256
MAX_TOKENS = 4
PAGES = 135  # per worker: 256 requests of ~2 pages each must wait for pages


def pool_flag() -> str:
    """--kv-cache-bytes for PAGES pages of 16 tokens of SmolLM2 in the CPU's default dtype."""
    import torch

    from pdmesh.config import engine_config_from_env
    from pdmesh.runtime.model_runner import resolve_dtype

    dtype = resolve_dtype(engine_config_from_env().dtype, "cpu")  # the workers' dtype
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return f"--worker-arg=--kv-cache-bytes={PAGES * 30 * 2 * 16 * 3 * 64 * itemsize}"


async def one(client, i: int) -> tuple[str, int, str]:
    """A streaming chat; returns (text, completion tokens, finish reason)."""
    stream = await client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": f"Count from {i} upwards."}],
        max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    text, usage, reason = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
        if chunk.usage:
            usage = chunk.usage.completion_tokens
    return text, usage, reason


async def burst(base: str) -> list:
    import openai

    async with openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0,
                                  timeout=600) as client:
        await one(client, -1)  # workers are routable
        return await asyncio.gather(*(one(client, i) for i in range(N)), return_exceptions=True)


async def grpc_burst(addr: str) -> list:
    """N Gateway.Generate streams over one channel, prompts of distinct lengths: each
    ends with its own prompt's usage (a mixed-up stream would carry another's)."""
    import grpc.aio

    from pdmesh.v1 import common_pb2 as cpb
    from pdmesh.v1 import gateway_pb2 as gpb
    from pdmesh.v1 import gateway_pb2_grpc as ggrpc

    sampling = cpb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)

    async def gen(stub, i: int):
        ids = [100 + (i * 7 + k) % 900 for k in range(5 + i % 40)]
        tokens, usage = 0, None
        async for msg in stub.Generate(gpb.GenerateRequest(token_ids=ids,
                                                           sampling_params=sampling)):
            tokens += len(msg.token_ids)
            usage = msg.usage if msg.HasField("usage") else usage
        assert usage is not None and usage.prompt_tokens == len(ids), (i, usage)
        return tokens
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = ggrpc.GatewayStub(ch)
        return await asyncio.gather(*(gen(stub, i) for i in range(N)), return_exceptions=True)


def gateway_grpc(lines: list[str]) -> str:
    line = next(x for x in lines if "gateway listening on" in x)
    return re.search(r"and (\S+) \(gRPC\)", line).group(1)


def pages_back(lines: list[str]) -> bool:
    for addr in worker_addresses(lines, "decode") + worker_addresses(lines, "colocated"):
        s = dgrpc.DecodeStub(auth.insecure_channel(addr, token=SERVE_TOKEN)).Stats(
            dpb.StatsRequest(), timeout=10)
        if not (s.free_pages == s.total_pages and s.used_pages == s.quarantined_pages == 0):
            return False
    for addr in worker_addresses(lines, "prefill"):
        s = pgrpc.PrefillStub(auth.insecure_channel(addr, token=SERVE_TOKEN)).Stats(
            ppb.PrefillStatsRequest(),
                                                                  timeout=10)
        if not (s.free_pages == s.total_pages and s.rooms == 0):
            return False
    return True


ENGINE_PROCESS = "--worker-arg=--engine-process"


@pytest.mark.parametrize("layout", [("--prefill", "1", "--decode", "1"),
                                    ("--prefill", "2", "--decode", "1"),
                                    ("--prefill", "0", "--decode", "0", "--colocated", "1"),
                                    ("--prefill", "1", "--decode", "1", ENGINE_PROCESS),
                                    ("--prefill", "0", "--decode", "0", "--colocated", "1",
                                     ENGINE_PROCESS)],
                         ids=["1P1D", "2P1D", "colocated", "1P1D-engine-process",
                              "colocated-engine-process"])
def test_256_concurrent_streams_complete_and_free_every_page(layout):
    # the gateway never loads torch, nor, with the engine in a process of its own, do the
    # workers' RPC processes (importing it: 3.2 s of a GPU worker's start on an H200 host):
    # not at start, not serving 512 streams
    roles = ("gateway", "prefill", "decode") if ENGINE_PROCESS in layout else ("gateway",)
    mapped = run_bursts(layout, check=lambda proc: torch_mapped(proc, roles))
    assert not mapped, mapped


def torch_mapped(proc, roles) -> dict[int, str]:
    """{pid: role} of serve's children of these roles that have libtorch mapped."""
    pids = {role: child_pids(proc.pid, role) for role in roles}
    # every layout has a gateway and a decode (a colocated worker is `pdmesh decode ...`)
    assert all(pids[r] for r in ("gateway", "decode") if r in pids), pids
    return {pid: role for role, ps in pids.items() for pid in ps
            if "libtorch" in open(f"/proc/{pid}/maps").read()}


def test_256_concurrent_streams_with_serves_own_threads_and_priorities():
    """1P1D as a user runs it: serve picks the workers' threads, and the decode worker's
    engine thread steps at nice 19 beside the prefill (the tests above run one thread
    each, which turns that rule off)."""
    layout = ("--prefill", "1", "--decode", "1")
    nices = run_bursts(layout, thread_rule=True, check=lambda proc: (
        max(thread_nices(child_pids(proc.pid, "decode")[0])),
        max(thread_nices(child_pids(proc.pid, "prefill")[0]))))
    assert nices == (19, 0)  # (decode, prefill): the highest nice of any of its threads


def run_bursts(layout, check=None, thread_rule: bool = False):
    """256 REST streams (and, at 1P1D, 256 gRPC ones at once) through `pdmesh serve
    <layout>`; every one completes and every page comes back. Returns `check(proc)`, run
    while the mesh is up."""
    # a 4 s lease: 512 streams on 2 shared cores must not cost a worker its registration
    proc, base, lines = start_serve(*layout, pool_flag(), "--heartbeat-interval", "2",
                                    thread_rule=thread_rule)
    try:
        # 1P1D takes the REST and the gRPC bursts at once: 512 streams
        both = layout[1] == "1" and layout[3] == "1"

        async def bursts():
            rest = burst(base)
            if not both:
                return await rest, []
            return await asyncio.gather(rest, grpc_burst(gateway_grpc(lines)))
        results, grpc_results = asyncio.run(asyncio.wait_for(bursts(), 900))
        failed = [r for r in results + grpc_results if isinstance(r, BaseException)]
        assert not failed, f"{len(failed)} of {N} failed, e.g. {failed[0]!r}"
        assert all(n == MAX_TOKENS and reason == "length" and text
                   for text, n, reason in results), results[:3]
        assert all(n == MAX_TOKENS for n in grpc_results), grpc_results[:3]
        assert wait_until(lambda: pages_back(lines), 20), "KV pages leaked"
        return check(proc) if check else None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines[-40:])
