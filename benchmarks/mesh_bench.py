"""1P1D against one colocated worker behind the same gateway: TTFT and TPOT.

    .venv/bin/python benchmarks/mesh_bench.py [--concurrency 1 16] [--requests-per-client 2]

Starts `pdmesh serve` twice (`--prefill 1 --decode 1`, then `--colocated 1`), sends
streaming chat requests through the `openai` client at each concurrency, and prints one
row per (deployment, concurrency). TTFT = time to the first non-empty content chunk;
TPOT = (e2e - TTFT) / (output tokens - 1), as sglang's bench_serving defines them.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

PROMPT = "Write a short story about a lighthouse keeper and a storm. " * 4


def start_serve(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "pdmesh.cli", "serve", "--port", "0",
                             "--grpc-port", "0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        m = re.search(r"ready — .*gateway (\S+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, f"http://{m.group(1)}/v1"
    raise RuntimeError("pdmesh serve did not start")


async def one(client, max_tokens: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    ttft, n = None, 0
    stream = await client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": PROMPT}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and ttft is None:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            n = chunk.usage.completion_tokens
    e2e = time.perf_counter() - t0
    return ttft, (e2e - ttft) / max(1, n - 1), n


async def measure(base: str, concurrency: int, per_client: int, max_tokens: int) -> list:
    import openai

    client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=20)
    await one(client, 4)  # warm-up (and waits until workers are routable)

    async def worker() -> list:
        return [await one(client, max_tokens) for _ in range(per_client)]
    results = await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()  # inside the loop that opened its connections
    return [r for rs in results for r in rs]


def measure_deployment(serve_args: list[str], concurrencies: list[int], per_client: int,
                       max_tokens: int) -> list[tuple[int, list]]:
    """Start `pdmesh serve <serve_args>`, run `measure` at each concurrency, stop it;
    returns [(concurrency, [(ttft, tpot, output tokens), ...]), ...]."""
    proc, base = start_serve(serve_args)
    try:
        return [(c, asyncio.run(measure(base, c, per_client, max_tokens))) for c in concurrencies]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    rows = []
    for name, serve_args in (("1P1D", ["--prefill", "1", "--decode", "1"]),
                             ("colocated", ["--colocated", "1"])):
        for c, res in measure_deployment(serve_args + ["--worker-arg=--kv-cache-bytes=300000000"],
                                         args.concurrency, args.requests_per_client,
                                         args.max_tokens):
            ttft, tpot = [r[0] for r in res], [r[1] for r in res]
            rows.append((name, c, statistics.mean(ttft), max(ttft), statistics.mean(tpot)))
    print("| deployment | concurrency | mean TTFT s | max TTFT s | mean TPOT s |")
    print("|---|---|---|---|---|")
    for name, c, t, tmax, p in rows:
        print(f"| {name} | {c} | {t:.3f} | {tmax:.3f} | {p:.4f} |")


if __name__ == "__main__":
    main()
