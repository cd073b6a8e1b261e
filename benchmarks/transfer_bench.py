"""KV transfer micro-benchmark: GB/s of Transport.write_pages between two processes.

    python benchmarks/transfer_bench.py [--protocol tcp] [--hostname 127.0.0.1] [--json]

Pages are SmolLM2-135M's KV page (30 layers x 16 tokens x K/V x 3 heads x 64 x fp32 =
737,280 bytes). Cases: one run of 1, 8 and 64 consecutive pages (1 descriptor each) and
64 scattered pages (64 descriptors). The destination pool lives in a child process
(pdmesh.transfer.peer), so bytes really cross a socket (tcp) or the NIC (rdma).
`run_bench()` returns the rows for a CLI to print.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from pdmesh.transfer import get_transport, plan_runs
from pdmesh.transfer.peer import PoolPeer, make_pool

PAGE_SHAPE = (30, 16, 2, 3, 64)  # SmolLM2-135M, float32
POOL_PAGES = 128


def cases(pool_pages: int = POOL_PAGES) -> dict[str, tuple[list[int], list[int]]]:
    """name -> (src_pages, dst_pages). Scattered uses even ids only, so no two pairs merge."""
    rng = random.Random(0)
    evens = list(range(0, pool_pages, 2))
    return {
        "run of 1": ([5], [9]),
        "run of 8": (list(range(8, 16)), list(range(40, 48))),
        "run of 64": (list(range(0, 64)), list(range(64, 128))),
        "64 scattered": (rng.sample(evens, 64), rng.sample(evens, 64)),
    }


def time_case(transport, peer, src_base, src_pages, dst_pages, min_seconds=0.5, min_reps=5):
    """Median seconds of write_pages over >= min_reps repetitions and >= min_seconds."""
    args = (peer.session_id, src_base, peer.base, peer.bytes_per_page, src_pages, dst_pages)
    transport.write_pages(*args)  # warm-up: handshake, connections, page faults
    times, t_end = [], time.perf_counter() + min_seconds
    while len(times) < min_reps or time.perf_counter() < t_end:
        times.append(transport.write_pages(*args).seconds)
    return statistics.median(times), len(times)


def run_bench(transport_name: str = "mooncake", **transport_kwargs) -> list[dict]:
    """Measure every case; returns rows of {case, pages, descriptors, bytes, ms, gbps, reps}."""
    transport = get_transport(transport_name)(**transport_kwargs)
    peer = PoolPeer.start(POOL_PAGES, PAGE_SHAPE, transport=transport_name, **transport_kwargs)
    try:
        src = make_pool(POOL_PAGES, PAGE_SHAPE, seed=0)
        src_base = transport.register(src)
        rows = []
        for name, (s, d) in cases().items():
            sec, reps = time_case(transport, peer, src_base, s, d)
            nbytes = len(s) * peer.bytes_per_page
            rows.append(dict(case=name, pages=len(s), descriptors=len(plan_runs(s, d)),
                             bytes=nbytes, ms=sec * 1e3, gbps=nbytes / sec / 1e9, reps=reps))
        return rows
    finally:
        peer.stop()
        transport.close()


def format_table(rows: list[dict]) -> str:
    """Fixed-width table of run_bench rows."""
    lines = [f"{'case':<14}{'pages':>6}{'descr':>7}{'MB':>9}{'ms':>10}{'GB/s':>8}{'reps':>6}"]
    for r in rows:
        lines.append(f"{r['case']:<14}{r['pages']:>6}{r['descriptors']:>7}{r['bytes'] / 1e6:>9.2f}"
                     f"{r['ms']:>10.3f}{r['gbps']:>8.2f}{r['reps']:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transport", default="mooncake")
    ap.add_argument("--protocol", default="tcp", choices=["tcp", "rdma"])
    ap.add_argument("--hostname", default="127.0.0.1")
    ap.add_argument("--device-name", default="", help="rdma: HCAs, e.g. mlx5_0,mlx5_1")
    ap.add_argument("--json", action="store_true", help="print rows as JSON lines")
    a = ap.parse_args(argv)
    rows = run_bench(a.transport, hostname=a.hostname, protocol=a.protocol,
                     device_name=a.device_name)
    print("\n".join(json.dumps(r) for r in rows) if a.json else format_table(rows))


if __name__ == "__main__":
    main()
