"""256 concurrent streaming requests through `pdmesh serve` (the real openai client):
1P1D, 2P1D and colocated. Every request completes with its own tokens, none fails, and
every worker's KV pages are back to total afterwards.

256 is four times the workers' default `max_running_requests` (64), and the pools are
small (~135 pages of 16 tokens), so requests wait in every queue the mesh has: the
decode's pre-allocation queue, the prefill's queue and its budget of rooms computed
ahead of their decode. The old sync servers (32 threads each) stalled at 32 here.
"""
from __future__ import annotations

import asyncio
import signal

import grpc
import pytest

from mesh_procs import start_serve, wait_until, worker_addresses
from pdmesh.v1 import decode_pb2 as dpb
from pdmesh.v1 import decode_pb2_grpc as dgrpc
from pdmesh.v1 import prefill_pb2 as ppb
from pdmesh.v1 import prefill_pb2_grpc as pgrpc

N = 256
MAX_TOKENS = 4
POOL = "--worker-arg=--kv-cache-bytes=100000000"  # ~135 pages of 16 tokens (fp32 SmolLM2)


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


def pages_back(lines: list[str]) -> bool:
    for addr in worker_addresses(lines, "decode") + worker_addresses(lines, "colocated"):
        s = dgrpc.DecodeStub(grpc.insecure_channel(addr)).Stats(dpb.StatsRequest(), timeout=10)
        if not (s.free_pages == s.total_pages and s.used_pages == s.quarantined_pages == 0):
            return False
    for addr in worker_addresses(lines, "prefill"):
        s = pgrpc.PrefillStub(grpc.insecure_channel(addr)).Stats(ppb.PrefillStatsRequest(),
                                                                  timeout=10)
        if not (s.free_pages == s.total_pages and s.rooms == 0):
            return False
    return True


@pytest.mark.parametrize("layout", [("--prefill", "1", "--decode", "1"),
                                    ("--prefill", "2", "--decode", "1"),
                                    ("--prefill", "0", "--decode", "0", "--colocated", "1")],
                         ids=["1P1D", "2P1D", "colocated"])
def test_256_concurrent_streams_complete_and_free_every_page(layout):
    proc, base, lines = start_serve(*layout, POOL)
    try:
        results = asyncio.run(asyncio.wait_for(burst(base), 900))
        failed = [r for r in results if isinstance(r, BaseException)]
        assert not failed, f"{len(failed)} of {N} failed, e.g. {failed[0]!r}"
        assert all(n == MAX_TOKENS and reason == "length" and text
                   for text, n, reason in results), results[:3]
        assert wait_until(lambda: pages_back(lines), 20), "KV pages leaked"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines[-40:])
