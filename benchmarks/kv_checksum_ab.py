"""What the KV checksum costs: `pdmesh serve` 1P1D with --kv-checksum on and off, both
up at once, measured alternately (on, off, on, off, ...) so drift hits both alike.

    .venv/bin/python benchmarks/kv_checksum_ab.py [--rounds 3] [--number 5]

Each round and mode: `pdmesh bench` chat, concurrency 1, 8 output tokens, prompts of
256 and of 2048 tokens. Prints per-round mean TTFT and a markdown table of the mean
over rounds. First, in process, the work the checksum adds to one room's TTFT, timed
alone (best of 7): the default model's pool (SmolLM2-135M, this machine's dtype),
source digest and destination digested in place over shm (concurrently, as the prefill
does), then the decode's digest of its pool.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

MODES = ["on", "off"]


def start_serve(checksum: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdmesh.cli", "serve", "--port", "0", "--grpc-port", "0",
         "--worker-arg=--kv-cache-bytes=400000000", f"--worker-arg=--kv-checksum={checksum}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)
    for line in proc.stdout:
        m = re.search(r"ready — .*gateway (\S+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, f"http://{m.group(1).rstrip(',')}/v1"
    raise SystemExit(f"serve (checksum {checksum}) exited")


def bench(base: str, input_len: int, number: int) -> float:
    """Mean TTFT (s) of `number` chat requests at concurrency 1."""
    out = os.path.join(tempfile.mkdtemp(), "r.json")
    subprocess.run([sys.executable, "-m", "pdmesh.cli", "bench", "--base-url", base,
                    "--backend", "chat", "--input-len", str(input_len), "--output-len", "8",
                    "--parallel", "1", "--number", str(number), "--warmup", "1",
                    "--no-progress", "--output", out], check=True, capture_output=True)
    with open(out) as f:
        return json.load(f)["runs"][0]["ttft"]["mean"]


def component_ms(tokens: int) -> dict[str, float]:
    """Milliseconds of each integrity step for one room of `tokens` prompt tokens, as
    the workers run them: through a Router bound to a shared-memory pool."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from pdmesh.runtime.model_runner import resolve_dtype
    from pdmesh.transfer import shm
    from pdmesh.transfer.checksum import pages_checksum
    from pdmesh.transfer.route import Destination, Router

    pages = list(range(0, 2 * (tokens // 16), 2))  # scattered, as an allocator gives them
    shape, dtype = (2 * len(pages) + 2, 30, 16, 2, 3, 64), resolve_dtype("auto", "cpu")
    src = torch.randn(shape).to(dtype)
    dst = shm.alloc_pool(shape, dtype)
    bpp = src[0].numel() * src.element_size()
    router = Router(None, 0, src, bpp, path="shm", my_host="h")
    d = Destination("d:1", 0, "h", (shm.export_pool(dst),))
    router.write_pages(d, pages, pages)
    pool = ThreadPoolExecutor(2)

    def on_check():  # the prefill's check: source and read-back digested at once
        a = pool.submit(pages_checksum, src, pages, "crc32")
        b = pool.submit(router.checksum_pages, d, pages, "crc32")
        assert a.result() == b.result()

    def best(fn) -> float:
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    out = {"MB": len(pages) * bpp / 1e6, "dtype": str(dtype).replace("torch.", ""),
           "write": best(lambda: router.write_pages(d, pages, pages)),
           "source": best(lambda: pages_checksum(src, pages, "crc32")),
           "prefill check": best(on_check),
           "decode check": best(lambda: pages_checksum(dst, pages, "crc32"))}
    router.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--number", type=int, default=5)
    ap.add_argument("--input-len", type=int, nargs="+", default=[256, 2048])
    ap.add_argument("--modes", nargs="+", default=["on", "off"],
                    help="--kv-checksum values to compare, the baseline last")
    args = ap.parse_args()
    MODES[:] = args.modes
    for n in args.input_len:
        c = component_ms(n)
        print(f"in process, {n} tokens ({c['MB']:.1f} MB, {c['dtype']}): shm write "
              f"{c['write']:.1f} ms; added by `on`: prefill check {c['prefill check']:.1f}"
              f" + decode check {c['decode check']:.1f} ms; by `decode`: source digest "
              f"{c['source']:.1f} + decode check {c['decode check']:.1f} ms", flush=True)
    serves = {m: start_serve(m) for m in MODES}
    ttft: dict[tuple[str, int], list[float]] = {}
    try:
        time.sleep(3)  # the gateways learn their workers from the registry
        for r in range(args.rounds):
            for n in args.input_len:
                for m in (MODES if r % 2 == 0 else MODES[::-1]):
                    t = bench(serves[m][1], n, args.number)
                    ttft.setdefault((m, n), []).append(t)
                    print(f"round {r + 1} input {n} checksum {m}: TTFT {t * 1e3:.1f} ms",
                          flush=True)
    finally:
        for proc, _ in serves.values():
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
    base = MODES[-1]
    print(f"\n| prompt tokens | --kv-checksum | mean TTFT (ms) | vs {base} (ms) | cost |")
    print("|---|---|---|---|---|")
    for n in args.input_len:
        off = statistics.mean(ttft[(base, n)])
        for m in MODES:
            t = statistics.mean(ttft[(m, n)])
            print(f"| {n} | {m} | {t * 1e3:.1f} | {(t - off) * 1e3:+.1f} | "
                  f"{(t - off) / off * 100:+.1f}% |")
    print("\nper round (ms):", json.dumps({f"{m} {n}": [round(x * 1e3, 1) for x in v]
                                         for (m, n), v in ttft.items()}))


if __name__ == "__main__":
    main()
