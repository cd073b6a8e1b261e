"""Time of the KV checksum of one prompt's pages.

    python benchmarks/checksum_speed.py [--device cuda] [--reps 20] [--pages 256 16]

Pages of the default model (SmolLM2-135M: 368,640 bytes a page) and of an 8B model
(Llama-3-8B: 2 MiB a page), scattered in a pool twice the room's size; --pages 256 is a
4,096-token prompt, 16 a 256-token one. On a CPU, first the CPU pools' algorithms
(pdmesh.transfer.checksum.pages_checksum): "crc32" (zlib, the CPU writers' algorithm
until 2026-11-30) and "xxh3" (XXH3-64, now), with scattered pages and with one run of
consecutive pages, in GB/s of page bytes. Then wsum64: "per page" is pdmesh's CPU way
and was its GPU way (about 8 device ops per page), "chunked" its GPU way now; both
values are checked equal. Median wall ms per checksum, host sync included (the
checksum returns a Python int).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import xxhash  # noqa: E402

from pdmesh.transfer import checksum as ck  # noqa: E402

SHAPES = {"smollm2-135m": (30, 16, 2, 3, 64), "llama3-8b": (32, 16, 2, 8, 128)}


def per_page(pool: torch.Tensor, pages: list[int]) -> int:
    """wsum64 one page at a time (the reference definition)."""
    words = pool[0].numel() * pool.element_size() // 4
    w, m = ck._table(words, pool.device), ck._table(len(pages), pool.device, offset=1)
    total = torch.zeros((), dtype=torch.int64, device=pool.device)
    for i, p in enumerate(pages):
        x = pool[p].contiguous().view(torch.int32).reshape(-1).to(torch.int64)
        total += (x * w).sum() * m[i]
    return int(total.item()) & ck._MASK


def timed(fn, reps: int) -> tuple[float, int]:
    value = fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, value


def cpu_algos(pages_n: int, reps: int) -> None:
    """GB/s of crc32 vs xxh3 over each shape's pages (median of `reps`)."""
    print("| shape | pages | MB | layout | crc32 ms | crc32 GB/s | xxh3 ms | xxh3 GB/s "
          "| speed-up |\n|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for name, shape in SHAPES.items():
        pool = torch.randn((2 * pages_n, *shape)).to(torch.bfloat16)
        mb = pages_n * pool[0].numel() * 2 / 1e6
        layouts = {"scattered": random.Random(0).sample(range(2 * pages_n), pages_n),
                   "one run": list(range(pages_n // 2, pages_n // 2 + pages_n))}
        for layout, pages in layouts.items():
            row = []
            for algo in ("crc32", "xxh3"):
                ms, _ = timed(lambda: ck.pages_checksum(pool, pages, algo), reps)
                row += [ms, mb / ms]  # MB per ms = GB/s
            print(f"| {name} | {pages_n} | {mb:.1f} | {layout} | {row[0]:.3f} | "
                  f"{row[1]:.1f} | {row[2]:.3f} | {row[3]:.1f} | {row[0] / row[2]:.1f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pages", type=int, nargs="+", default=[256])
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    print(f"device {a.device} ({torch.cuda.get_device_name() if a.device == 'cuda' else 'cpu'})"
          f", torch {torch.__version__}, xxhash {xxhash.VERSION}\n")
    if a.device == "cpu":
        for n in a.pages:
            cpu_algos(n, a.reps)
        print()
    for n in a.pages:
        wsum64(a.device, n, a.reps)


def wsum64(device: str, pages_n: int, reps: int) -> None:
    """wsum64 per page vs chunked, on `device`; on a GPU also pdmesh's whole call
    (pages_checksum: the side stream, the pinned copy, the event waited for asleep)."""
    gpu = device == "cuda"
    print("| shape | pages | MiB | wsum64 per page ms | chunked ms | speed-up |"
          + (" pages_checksum ms |" if gpu else "") + "\n|---|---:|---:|---:|---:|---:|"
          + ("---:|" if gpu else ""))
    for name, shape in SHAPES.items():
        pool = torch.randn((2 * pages_n, *shape), device=device).to(torch.bfloat16)
        pages = random.Random(0).sample(range(2 * pages_n), pages_n)
        slow, v1 = timed(lambda: per_page(pool, pages), reps)
        w = ck._table(pool[0].numel() // 2, pool.device)
        m = ck._table(len(pages), pool.device, offset=1)
        fast, v2 = timed(lambda: int(ck._chunked(pool, pages, w, m).item()) & ck._MASK, reps)
        assert v1 == v2, f"{name}: chunked {v2} != per page {v1}"
        mib = pages_n * pool[0].numel() * 2 / 2**20
        row = f"| {name} | {pages_n} | {mib:.0f} | {slow:.2f} | {fast:.2f} | {slow / fast:.1f}x |"
        if gpu:
            whole, v3 = timed(lambda: ck.pages_checksum(pool, pages, "wsum64"), reps)
            assert v3 == v1, f"{name}: pages_checksum {v3} != per page {v1}"
            row += f" {whole:.2f} |"
        print(row)


if __name__ == "__main__":
    main()
