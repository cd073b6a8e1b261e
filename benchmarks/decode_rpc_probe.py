"""How responsive a decode worker's RPC process stays while prefill workers are busy:
start `pdmesh serve --prefill N --decode 1` (serve picks the CPU threads: no
OMP_NUM_THREADS), send a burst of long prompts at once, and call the decode's
grpc.health.v1 Check every 50 ms meanwhile. Prints the burst's length and the Check
latency (median, p99, max). A stall here stalls every stream and Transfer of the worker.

    .venv/bin/python benchmarks/decode_rpc_probe.py --prefill 2 [--env PDMESH_CPU_IDLE=0]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import threading
import time

TOKEN = "decode-rpc-probe"


def start_serve(prefill: int, extra_env: list[str]) -> tuple[subprocess.Popen, str, str]:
    """serve (multi_turn.start_serve, with this environment); returns (process, decode
    address, gateway REST base URL) once it is ready."""
    from multi_turn import start_serve as start

    os.environ["PDMESH_CLUSTER_TOKEN"] = TOKEN
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.pop(k, None)
    os.environ.update(kv.split("=", 1) for kv in extra_env)
    proc, base, lines = start(["--prefill", str(prefill), "--decode", "1",
                               "--heartbeat-interval", "1"])
    ready = next(x for x in lines if "serve: ready —" in x)
    return proc, re.search(r"decode-\d+ ([^\s,]+)", ready).group(1), base


def probe(addr: str, out: list[float], stop: threading.Event) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from pdmesh import auth

    stub = health_pb2_grpc.HealthStub(auth.insecure_channel(addr, token=TOKEN))
    while not stop.is_set():
        t = time.perf_counter()
        stub.Check(health_pb2.HealthCheckRequest(), timeout=60)
        out.append(time.perf_counter() - t)
        stop.wait(0.05)


async def burst(base: str, n: int, prompt: int, out_tokens: int) -> tuple[float, int]:
    """(seconds, requests that got every token) for n prompts sent at once."""
    import openai

    client = openai.AsyncOpenAI(base_url=base, api_key="x", timeout=600)
    rnd = random.Random(1)

    async def one() -> int:
        r = await client.completions.create(
            model="default", prompt=[rnd.randrange(100, 40000) for _ in range(prompt)],
            max_tokens=out_tokens, temperature=0, extra_body={"ignore_eos": True})
        return r.usage.completion_tokens
    t = time.perf_counter()
    got = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    return time.perf_counter() - t, sum(g == out_tokens for g in got)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefill", type=int, default=2)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--output", type=int, default=16)
    ap.add_argument("--env", action="append", default=[], help="K=V for serve's environment")
    a = ap.parse_args()
    proc, dec, gw = start_serve(a.prefill, a.env)
    lat: list[float] = []
    stop = threading.Event()
    try:
        threading.Thread(target=probe, args=(dec, lat, stop), daemon=True).start()
        time.sleep(1)
        lat.clear()
        secs, ok = asyncio.run(burst(gw, a.requests, a.prompt, a.output))
        stop.set()
        if not lat:
            raise SystemExit("the decode answered no Health Check during the burst")
        lat.sort()
        print(f"{a.prefill}P1D {' '.join(a.env) or '(defaults)'}: burst {secs:.1f} s, {ok} of "
              f"{a.requests} complete; decode Health Check n {len(lat)} median "
              f"{1e3 * lat[len(lat) // 2]:.1f} ms p99 {1e3 * lat[int(0.99 * (len(lat) - 1))]:.1f}"
              f" ms max {1e3 * lat[-1]:.1f} ms")
    finally:
        stop.set()
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
