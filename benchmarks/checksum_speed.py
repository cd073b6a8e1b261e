"""Time of the KV checksum of one prompt's pages: wsum64 chunked (pdmesh) vs per page.

    python benchmarks/checksum_speed.py [--device cuda] [--reps 20]

A 4,096-token prompt's pages of the default model (SmolLM2-135M: 256 pages of 368,640
bytes) and of an 8B model (Llama-3-8B: 256 pages of 2 MiB), scattered in a pool twice
that size. "per page" is pdmesh's CPU way and was its GPU way (about 8 device ops per
page), "chunked" its GPU way now; both values are checked equal.
Median wall ms per checksum, host sync included (the checksum returns a Python int).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pages", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    print(f"device {a.device} ({torch.cuda.get_device_name() if a.device == 'cuda' else 'cpu'})"
          f", torch {torch.__version__}\n")
    print("| shape | pages | MiB | per page ms | chunked ms | speed-up |\n|---|---:|---:|---:|---:|---:|")
    for name, shape in SHAPES.items():
        pool = torch.randn((2 * a.pages, *shape), device=a.device).to(torch.bfloat16)
        pages = random.Random(0).sample(range(2 * a.pages), a.pages)
        slow, v1 = timed(lambda: per_page(pool, pages), a.reps)
        w = ck._table(pool[0].numel() // 2, pool.device)
        m = ck._table(len(pages), pool.device, offset=1)
        fast, v2 = timed(lambda: int(ck._chunked(pool, pages, w, m).item()) & ck._MASK, a.reps)
        assert v1 == v2, f"{name}: chunked {v2} != per page {v1}"
        mib = a.pages * pool[0].numel() * 2 / 2**20
        print(f"| {name} | {a.pages} | {mib:.0f} | {slow:.2f} | {fast:.2f} | {slow / fast:.1f}x |")


if __name__ == "__main__":
    main()
