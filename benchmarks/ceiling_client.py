"""The load side of benchmarks/gateway_ceiling.py: N concurrent streaming chat clients.

Each stream posts request after request until the deadline and records, per SSE event,
its receive time and how many tokens it carried (the fakes stream one ' word' a token,
so a delta's token count is its count of spaces).

As a process of its own (gateway_ceiling.py --client-procs K starts K of these):

    python benchmarks/ceiling_client.py --url URL --streams S --seconds D --seed P \
        --out FILE.json [--index0 J --stride K --total N] [--events]

prints `ready`, waits for a line on stdin (so K clients start together), runs `load`,
and writes {tokens, errors, t0, t1, wall, cpu, streams} to --out (t0/t1: the load's
monotonic start and end; cpu: this process's utime + stime during the load; streams:
each request's [id, [[receive time, tokens]...]] with --events, else []).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

try:
    from orjson import loads
except ImportError:  # the stdlib parser is slower but gives the same result
    loads = json.loads

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def set_prompt_bytes(n: int) -> None:
    """Make the prompt about `n` bytes of English-like words (0: the short default)."""
    if n <= 0:
        return
    words = ("the lighthouse keeper saw a ship in the storm and lit the lamp again while "
             "waves broke on the rocks below the old tower at night ").split()
    text = " ".join(words[i % len(words)] for i in range(n // 4))[:n]
    PROMPT[0] = {"role": "user", "content": text}


@dataclass
class Result:
    tokens: int = 0
    errors: int = 0
    wall: float = 0.0
    t0: float = 0.0  # monotonic start and end of the load
    t1: float = 0.0
    streams: list[tuple[str, list[tuple[float, int]]]] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(max_tokens: int, seed: int) -> dict:
    return {"model": "default", "messages": PROMPT, "max_tokens": max_tokens, "stream": True,
            "seed": seed, "ignore_eos": True, "temperature": 0}


async def one_stream(session: aiohttp.ClientSession, url: str, payload: dict
                     ) -> tuple[str, list[tuple[float, int]]]:
    """One request; (response id, [(receive time, tokens)]). Raises on a bad status."""
    events, rid = [], ""
    async with session.post(url + "/v1/chat/completions", json=payload) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            now = time.monotonic()
            if line.startswith(b"data: [DONE]"):
                break
            obj = loads(line[6:])
            rid = rid or obj["id"]
            for c in obj.get("choices") or ():
                text = (c.get("delta") or {}).get("content") or ""
                if text:
                    events.append((now, text.count(" ")))
    return rid, events


async def load(url: str, streams: int, max_tokens: int, seconds: float, seed: int,
               index0: int = 0, stride: int = 1, total: int | None = None) -> Result:
    """`streams` concurrent clients, each sending requests until `seconds` have passed.
    Paced (seed > 0: microseconds a token), client i starts (index0 + i * stride) / total
    of one request's duration late, so request starts are spread out as in steady traffic
    rather than arriving all at once every request (one process: 0, 1, ... / streams; K
    processes interleave their streams: process j has index0 = j, stride = K)."""
    res, payload = Result(), body(max_tokens, seed)
    deadline = time.monotonic() + seconds
    spread = max_tokens * seed / 1e6
    total = total or streams

    async def client(session, i):
        await asyncio.sleep(spread * (index0 + i * stride) / total)
        while time.monotonic() < deadline:
            try:
                rid, events = await one_stream(session, url, payload)
            except (aiohttp.ClientError, RuntimeError, asyncio.TimeoutError):
                res.errors += 1
                await asyncio.sleep(0.1)
                continue
            res.tokens += sum(k for _, k in events)
            res.streams.append((rid, events))

    gc.collect()
    gc.disable()  # a full collection of this process would read as the gateway's latency
    t0 = res.t0 = time.monotonic()
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        await asyncio.gather(*(client(session, i) for i in range(streams)))
    res.t1 = time.monotonic()
    res.wall = res.t1 - t0
    gc.enable()
    return res


def merge(results: list[Result]) -> Result:
    """One Result of several clients' (run at once): tokens, errors and streams summed,
    wall from the first start to the last end."""
    out = Result(t0=min(r.t0 for r in results), t1=max(r.t1 for r in results))
    out.wall = out.t1 - out.t0
    for r in results:
        out.tokens += r.tokens
        out.errors += r.errors
        out.streams += r.streams
    return out


def latencies(res: Result, send_logs: str | list[str]) -> tuple[list[float], list[float]]:
    """(fake send -> client receive per token, client inter-token gaps), in seconds.
    `send_logs`: the fakes' logs (one per fake), matched to the client's requests by the
    response id, which each fake makes unique across fakes."""
    sends = {}
    for log in [send_logs] if isinstance(send_logs, str) else send_logs:
        for line in Path(log).read_text().splitlines():
            try:
                rid, times = json.loads(line)
            except ValueError:  # a line cut by a flush in progress
                continue
            sends[rid] = times
    added, gaps = [], []
    for rid, events in res.streams:
        recv = [t for t, k in events for _ in range(k)]
        sent = sends.get(rid)
        if sent is None:
            continue
        added += [r - s for r, s in zip(recv, sent)]
        gaps += [b - a for a, b in zip(recv, recv[1:])]
    return added, gaps


def pct(sorted_xs: list[float], p: float) -> float:
    if not sorted_xs:
        return float("nan")
    return sorted_xs[min(len(sorted_xs) - 1, int(len(sorted_xs) * p / 100))]


def wait_ready(url: str, timeout: float = 90) -> None:
    """Until a tiny streaming request gets through (workers registered and routable)."""
    async def attempt():
        async with aiohttp.ClientSession() as s:
            _, events = await one_stream(s, url, body(2, 0))
            return sum(k for _, k in events) == 2

    deadline, last = time.monotonic() + timeout, None
    while True:
        try:
            if asyncio.run(attempt()):
                return
        except (aiohttp.ClientError, RuntimeError, OSError) as e:
            last = e
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} never served a request ({last!r})")
        time.sleep(0.3)


def link_mapped_packages(checkout: str) -> None:
    """Make `checkout` importable from PYTHONPATH: setup.py maps services/ and kernels/
    to pdmesh.services / pdmesh.kernels, so link them into its pdmesh/ folder."""
    for name in ("services", "kernels"):
        link = Path(checkout) / "pdmesh" / name
        if not link.exists():
            os.symlink(f"../{name}", link)


def main() -> None:
    ap = argparse.ArgumentParser(description="one client process of gateway_ceiling.py")
    ap.add_argument("--url", required=True)
    ap.add_argument("--streams", type=int, required=True)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--seed", type=int, default=0, help="pace: microseconds a token (0: none)")
    ap.add_argument("--prompt-bytes", type=int, default=0)
    ap.add_argument("--index0", type=int, default=0)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--total", type=int, default=0, help="streams of all processes")
    ap.add_argument("--events", action="store_true", help="write each request's events")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    set_prompt_bytes(args.prompt_bytes)
    print("ready", flush=True)
    sys.stdin.readline()
    c0 = os.times()
    res = asyncio.run(load(args.url, args.streams, args.max_tokens, args.seconds, args.seed,
                           args.index0, args.stride, args.total or None))
    c1 = os.times()
    Path(args.out).write_text(json.dumps({
        "tokens": res.tokens, "errors": res.errors, "t0": res.t0, "t1": res.t1,
        "wall": res.wall, "cpu": c1.user + c1.system - c0.user - c0.system,
        "streams": res.streams if args.events else []}))


if __name__ == "__main__":
    main()
