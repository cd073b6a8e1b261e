"""What the KV checksum costs: `pdmesh serve` 1P1D with --kv-checksum on and off, both
up at once, measured alternately (on, off, on, off, ...) so drift hits both alike.

    .venv/bin/python benchmarks/kv_checksum_ab.py [--rounds 3] [--number 5]

Each round and mode: `pdmesh bench` chat, concurrency 1, 8 output tokens, prompts of
256 and of 2048 tokens. Prints per-round mean TTFT and a markdown table of the mean
over rounds and of the per-round differences from the baseline (measured next to each
other, so the machine's drift cancels: its mean with its standard error, its median,
and in how many rounds the mode was the dearer). First, in process, the work the checksum adds to one room's TTFT, timed
alone (best of 7): the default model's pool (SmolLM2-135M, this machine's dtype),
source digest and destination digested in place over shm (concurrently, as the prefill
does), then the decode's digest of its pool, by crc32 and by xxh3. A mode may name the
CPU writers' algorithm: `--modes decode decode:crc32 off` (xxh3 is the default).
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


def start_serve(mode: str, prefix_cache: bool = False) -> tuple[subprocess.Popen, str]:
    """`mode`: a --kv-checksum value, optionally ":ALGO" for the CPU writers' algorithm
    (PDMESH_KV_CHECKSUM_ALGO: xxh3, the default, or crc32, the one before 2026-11-30).
    The workers' prefix cache is off unless `prefix_cache`: `pdmesh bench` sends the same
    prompts every call (its seed), so from the second round on the cache would prefill
    and move one page per request instead of all of them (the 2026-11-29 run predates
    the cache)."""
    checksum, _, algo = mode.partition(":")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if algo:
        env["PDMESH_KV_CHECKSUM_ALGO"] = algo
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdmesh.cli", "serve", "--port", "0", "--grpc-port", "0",
         "--worker-arg=--kv-cache-bytes=400000000", f"--worker-arg=--kv-checksum={checksum}",
         "--worker-arg=--" + ("" if prefix_cache else "no-") + "prefix-cache"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)
    said: list[str] = []
    for line in proc.stdout:
        said.append(line)
        m = re.search(r"ready — .*gateway (\S+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, f"http://{m.group(1).rstrip(',')}/v1"
    raise SystemExit(f"serve (checksum {mode}) exited:\n" + "".join(said[-30:]))


def bench(base: str, input_len: int, number: int, stat: str = "mean") -> float:
    """The `stat` (mean or median) TTFT (s) of `number` chat requests at concurrency 1."""
    out = os.path.join(tempfile.mkdtemp(), "r.json")
    run = subprocess.run([sys.executable, "-m", "pdmesh.cli", "bench", "--base-url", base,
                          "--backend", "chat", "--input-len", str(input_len),
                          "--output-len", "8", "--parallel", "1", "--number", str(number),
                          "--warmup", "1", "--no-progress", "--output", out],
                         capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"pdmesh bench failed ({run.returncode}):\n{run.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)["runs"][0]["ttft"][stat]


def ttft_parts(base_url: str) -> dict[str, float]:
    """Mean seconds (as ms) of each TTFT part the gateway measured so far
    (pdmesh_gateway_ttft_part_seconds: queue, prefill, transfer = prompt done -> KV
    written, first_decode = KV verified and in place -> token 1 sent) and of the TTFT;
    "rest" = TTFT less the parts: gateway, RPC hops, the decode's hold and its check."""
    import urllib.request

    text = urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics",
                                  timeout=10).read().decode()
    sums: dict[tuple[str, str], float] = {}  # (part, "sum" | "count") -> value
    for line in text.splitlines():
        m = re.match(r"pdmesh_gateway_time_to_first_token_seconds_(sum|count)"
                     r"(?:\{[^}]*\})? (\S+)", line)
        if m:
            sums[("ttft", m.group(1))] = float(m.group(2))
        m = re.match(r'pdmesh_gateway_ttft_part_seconds_(sum|count)\{part="(\w+)"\} (\S+)',
                     line)
        if m:
            sums[(m.group(2), m.group(1))] = float(m.group(3))
    out = {part: v / sums[(part, "count")] * 1e3 for (part, kind), v in sums.items()
           if kind == "sum" and sums.get((part, "count"))}
    if "ttft" in out:
        out["rest"] = out["ttft"] - sum(v for k, v in out.items() if k != "ttft")
    return out


def component_ms(tokens: int, algo: str) -> dict[str, float]:
    """Milliseconds of each integrity step for one room of `tokens` prompt tokens, as
    the workers run them: through a Router bound to a shared-memory pool."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from pdmesh.runtime.model_runner import resolve_dtype
    from pdmesh.transfer import shm
    from pdmesh.transfer.checksum import pages_checksum
    from pdmesh.transfer.route import Destination, Router

    torch.set_num_threads(1)  # as the workers run (OMP_NUM_THREADS=1): a 2-thread copy
    # on a loaded 2-core machine took 150 ms instead of 0.3
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
        a = pool.submit(pages_checksum, src, pages, algo)
        b = pool.submit(router.checksum_pages, d, pages, algo)
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
           "source": best(lambda: pages_checksum(src, pages, algo)),
           "prefill check": best(on_check),
           "decode check": best(lambda: pages_checksum(dst, pages, algo))}
    router.close()
    return out


def critical_path_ms(tokens: int, reps: int) -> dict[str, float]:
    """Median milliseconds from the start of a room's write to its KV being verified on
    the decode, through the workers' own code in one process: write_verified over a
    TransportWriter into a real shared-memory pool (write ‖ source digest; `on`: then
    the destination read back and digested in place), then the decode's
    TransportReceiver check, each on its thread hop as in the workers. Modes "off",
    "decode" and "on", each by crc32 and by xxh3, interleaved `reps` times (drift hits
    all alike); what a mode adds over "off" is what it adds to TTFT, hops included."""
    import asyncio
    from types import SimpleNamespace

    import torch

    from pdmesh.disagg.integrity import write_verified
    from pdmesh.disagg.ports import TransferTarget
    from pdmesh.runtime.model_runner import resolve_dtype
    from pdmesh.services.common.kv import TransportReceiver, TransportWriter
    from pdmesh.transfer import checksum as ck
    from pdmesh.transfer import shm
    from pdmesh.transfer.route import Router

    torch.set_num_threads(1)
    pages = list(range(0, 2 * (tokens // 16), 2))
    shape, dtype = (2 * len(pages) + 2, 30, 16, 2, 3, 64), resolve_dtype("auto", "cpu")
    src, dst = torch.randn(shape).to(dtype), shm.alloc_pool(shape, dtype)
    router = Router(None, 0, src, src[0].numel() * src.element_size(), path="shm",
                    my_host="h")
    tgt = TransferTarget("d:1", 0, tuple(pages), None, room=1, host_id="h",
                         local_endpoints=(shm.export_pool(dst),))
    count = SimpleNamespace(labels=lambda *a: count, inc=lambda *a: None,
                            observe=lambda *a: None)
    metrics = SimpleNamespace(transfer_bytes=count, transfer_pages=count,
                              transfer_seconds=count, transfer_failures=count)
    modes = {"off": ("off", ck.CPU_ALGO), "decode:crc32": ("decode", "crc32"),
             "decode:xxh3": ("decode", "xxh3"), "on:crc32": ("on", "crc32"),
             "on:xxh3": ("on", "xxh3")}
    writers = {m: TransportWriter(router, metrics, checksum=c) for m, (c, _) in modes.items()}
    decode = TransportReceiver(lambda op, args: ck.pages_checksum(dst, *args))

    async def room(mode: str) -> float:
        ck.CPU_ALGO = modes[mode][1]  # what the writer names
        t0 = time.perf_counter()
        _, want = await write_verified(writers[mode], 1, pages, tgt, lambda: False,
                                       lambda: None)
        if want is not None:
            assert await decode.checksum(pages, want.algo) == want
        return (time.perf_counter() - t0) * 1e3

    async def run() -> dict[str, list[float]]:
        times: dict[str, list[float]] = {m: [] for m in modes}
        for i in range(reps + 5):
            for m in (list(modes) if i % 2 else list(modes)[::-1]):
                t = await room(m)
                if i >= 5:  # warm-up: thread pools, the route's bind
                    times[m].append(t)
        return times
    times = asyncio.run(run())
    for w in writers.values():
        w.close()
    return {m: statistics.median(v) for m, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--number", type=int, default=5)
    ap.add_argument("--input-len", type=int, nargs="+", default=[256, 2048])
    ap.add_argument("--modes", nargs="+", default=["on", "off"],
                    help="--kv-checksum values to compare (MODE or MODE:ALGO), the "
                         "baseline last")
    ap.add_argument("--stat", choices=["mean", "median"], default="mean",
                    help="each round's TTFT: the mean of its requests (as on 2026-11-29) "
                         "or their median (steadier on a shared machine)")
    ap.add_argument("--path-reps", type=int, default=400,
                    help="rooms per mode of the in-process critical-path timing")
    ap.add_argument("--serve", action=argparse.BooleanOptionalAction, default=True,
                    help="the end-to-end A/B through pdmesh serve (--no-serve: in "
                         "process only)")
    ap.add_argument("--prefix-cache", action="store_true",
                    help="leave the workers' prefix cache on (start_serve says why not)")
    args = ap.parse_args()
    MODES[:] = args.modes
    for n, algo in [(n, a) for n in args.input_len for a in ("crc32", "xxh3")]:
        c = component_ms(n, algo)
        print(f"in process, {n} tokens ({c['MB']:.1f} MB, {c['dtype']}), {algo}: shm write "
              f"{c['write']:.2f} ms; added by `on`: prefill check {c['prefill check']:.2f}"
              f" + decode check {c['decode check']:.2f} ms; by `decode`: source digest "
              f"{c['source']:.2f} + decode check {c['decode check']:.2f} ms", flush=True)
    for n in args.input_len:
        c = critical_path_ms(n, args.path_reps)
        print(f"in process, {n} tokens, write start -> verified on the decode, median of "
              f"{args.path_reps}: " + ", ".join(f"{m} {v:.3f} ms" for m, v in c.items())
              + "; added over off: " + ", ".join(f"{m} {v - c['off']:+.3f} ms"
                                                   for m, v in c.items() if m != "off"),
              flush=True)
    if not args.serve:
        return
    serves: dict[str, tuple[subprocess.Popen, str]] = {}
    ttft: dict[tuple[str, int], list[float]] = {}
    try:  # a mesh that fails to start stops the ones already up too
        for m in MODES:
            serves[m] = start_serve(m, args.prefix_cache)
        time.sleep(3)  # the gateways learn their workers from the registry
        for r in range(args.rounds):
            for n in args.input_len:
                for m in (MODES if r % 2 == 0 else MODES[::-1]):
                    t = bench(serves[m][1], n, args.number, args.stat)
                    ttft.setdefault((m, n), []).append(t)
                    print(f"round {r + 1} input {n} checksum {m}: TTFT {t * 1e3:.1f} ms",
                          flush=True)
        for m, (_, base_url) in serves.items():
            print(f"{m}: TTFT parts, mean ms over every request of the run: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in ttft_parts(base_url).items()),
                  flush=True)
    finally:
        for proc, _ in serves.values():
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
    base = MODES[-1]
    print(f"\nper-round TTFT: {args.stat} of {args.number} requests")
    print(f"\n| prompt tokens | --kv-checksum | mean TTFT (ms) | vs {base} (ms) | cost | "
          f"paired vs {base}: mean ± s.e. (ms) | median (ms) | rounds dearer |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.input_len:
        off = statistics.mean(ttft[(base, n)])
        for m in MODES:
            t = statistics.mean(ttft[(m, n)])
            # per round, this mode minus the baseline measured next to it: drift cancels
            d = [(a - b) * 1e3 for a, b in zip(ttft[(m, n)], ttft[(base, n)])]
            se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else 0.0
            print(f"| {n} | {m} | {t * 1e3:.1f} | {(t - off) * 1e3:+.1f} | "
                  f"{(t - off) / off * 100:+.1f}% | {statistics.mean(d):+.1f} ± {se:.1f} | "
                  f"{statistics.median(d):+.1f} | {sum(x > 0 for x in d)}/{len(d)} |")
    print("\nper round (ms):", json.dumps({f"{m} {n}": [round(x * 1e3, 1) for x in v]
                                         for (m, n), v in ttft.items()}))


if __name__ == "__main__":
    main()
