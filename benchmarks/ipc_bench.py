"""CUDA IPC KV transfer benchmark: IpcPeer.write_pages between two processes on one GPU.

    python benchmarks/ipc_bench.py [--pages 256] [--min-seconds 0.5] [--json]

A spawned child owns the destination pool (2x the pages moved, sentinel-filled) and
exports it (pdmesh.transfer.cuda_ipc.export_pool); this process opens it and writes pages
of its own pool. Page shapes: Llama-3-8B (32 layers x 16 tokens x K/V x 8 heads x 128 x
bf16 = 2 MiB: 256 pages = 512 MiB) and SmolLM2-135M, the default model (30 x 16 x 2 x 3 x
64 x bf16 = 368,640 bytes). Cases per shape: one contiguous run and the same number of
scattered pages (unsorted, distinct destinations), against torch's own device-to-device
copy of the same bytes measured in this run (`copy_` between two tensors of this
process, and into the child's mapped pool). Every time is the median wall time of the
call, host sync included; "copy_pages kernel alone" is device time (CUDA events around
back-to-back launches), so the gap between it and write_pages is the per-call host cost
(validation, id upload, launch, wait). "CPU ms" is this process's user+system CPU time
per call (os.times): copy_ spins in its sync, write_pages sleeps through most of the copy
(IpcPeer._wait; its wait modes side by side, the default untagged); "launch ms" is the host
time of the last call from entry to launched (validation, id upload, launch). Goals checked on the 8B shape: write_pages >= 50% of torch copy_'s GB/s,
scattered within 20% of the contiguous run.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pdmesh.kernels.page_copy import copy_pages  # noqa: E402
from pdmesh.transfer.cuda_ipc import export_pool, open_peer  # noqa: E402

SHAPES = {  # name -> page shape; bf16, so bytes = 2 * product
    "llama3-8b": (32, 16, 2, 8, 128),
    "smollm2-135m": (30, 16, 2, 3, 64),
}
SENTINEL = 0xA5
# IpcPeer.wait_mode values: the default first (its rows carry no tag and are the checked ones)
WAIT_MODES = ("hybrid", "sleep", "spin", "sync")


def page_bytes(shape: tuple[int, ...]) -> int:
    n = 2
    for d in shape:
        n *= d
    return n


def _owner(conn, nbytes: int) -> None:
    # Child: owns a sentinel-filled pool of `nbytes`; sends its URI, then waits for "stop".
    pool = torch.full((nbytes,), SENTINEL, dtype=torch.uint8, device="cuda")
    conn.send(export_pool(pool))
    conn.recv()
    conn.send("stopped")


def timed(fn, min_seconds: float, min_reps: int = 10) -> tuple[float, int, float]:
    """(median wall seconds, reps, CPU seconds per call) of fn() after 3 warm-ups."""
    for _ in range(3):
        fn()
    times, t_end = [], time.perf_counter() + min_seconds
    c0 = os.times()
    while len(times) < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    c1 = os.times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    return statistics.median(times), len(times), cpu / len(times)


def gpu_timed(fn, reps: int = 20) -> tuple[float, int]:
    """(seconds per call, reps) of back-to-back launches between two CUDA events: the
    device time alone, without the host's launch and sync costs."""
    fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        fn()
    e1.record()
    e1.synchronize()
    return e0.elapsed_time(e1) / 1e3 / reps, reps


def bench_shape(name: str, shape: tuple[int, ...], pages: int, min_seconds: float) -> list[dict]:
    bpp = page_bytes(shape)
    nbytes = pages * bpp
    ctx = mp.get_context("spawn")
    conn, child_end = ctx.Pipe()
    child = ctx.Process(target=_owner, args=(child_end, 2 * pages * bpp), daemon=True)
    child.start()
    rows: list[dict] = []
    try:
        if not conn.poll(180):
            raise RuntimeError("the pool owner did not start")
        uri = conn.recv()
        local = torch.randint(0, 256, (2 * pages, bpp), dtype=torch.uint8, device="cuda")
        peer = open_peer(uri, local)
        rng = random.Random(0)
        run = (list(range(pages)), list(range(pages // 2, pages // 2 + pages)))
        scattered = (rng.sample(range(2 * pages), pages), rng.sample(range(2 * pages), pages))

        def row(case, sec, reps, cpu, n=pages):
            rows.append(dict(shape=name, case=case, pages=n, page_bytes=bpp, bytes=n * bpp,
                             ms=sec * 1e3, gbps=n * bpp / sec / 1e9,
                             cpu_ms=None if cpu is None else cpu * 1e3, reps=reps))

        a = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        mapped = peer._peer  # the child's pool, as this process maps it

        def copy(dst, src):
            dst.copy_(src)
            torch.cuda.synchronize()

        row("torch copy_ (this process)", *timed(lambda: copy(b, a), min_seconds))
        row("torch copy_ into peer pool", *timed(lambda: copy(mapped[:nbytes], a), min_seconds))
        del a, b
        s_ids, d_ids = (torch.tensor(x, device="cuda") for x in scattered)
        row(f"copy_pages kernel alone, {pages} scattered", *gpu_timed(
            lambda: copy_pages(local, mapped.view(-1, bpp), s_ids, d_ids)), None)
        del mapped  # before close: the mapping must not outlive the peer
        for mode in WAIT_MODES:
            peer.wait_mode = mode
            tag = "" if mode == WAIT_MODES[0] else f" [wait {mode}]"
            for case, (s, d) in (("ipc write_pages, 1 run", run),
                                 (f"ipc write_pages, {pages} scattered", scattered)):
                row(case + tag, *timed(lambda: peer.write_pages(s, d, bpp), min_seconds))
                rows[-1]["launch_ms"] = peer.host_s * 1e3  # the last call's, entry to launched
                # what landed in the child's pool is exactly the source pages
                if not torch.equal(peer.read_pages(d, bpp), local[s]):
                    raise AssertionError(f"{name} {case}: pages in the peer differ from the source")
        peer.wait_mode = WAIT_MODES[0]
        row("ipc write_pages, 1 page (latency)",
            *timed(lambda: peer.write_pages([3], [7], bpp), min_seconds), n=1)
        peer.close()
    finally:
        if child.is_alive():
            conn.send("stop")
            conn.poll(30)
        child.join(30)
    return rows


def checks(rows: list[dict]) -> dict:
    """The goals, on the first (8B) shape: ipc >= 50% of copy_, scattered within 20%."""
    by = {r["case"]: r for r in rows if r["shape"] == rows[0]["shape"]}
    ref = by["torch copy_ (this process)"]["gbps"]
    run = by["ipc write_pages, 1 run"]["gbps"]
    scat = next(r for c, r in by.items()
                if c.startswith("ipc write_pages") and c.endswith("scattered"))["gbps"]
    return {"shape": rows[0]["shape"], "run_vs_copy": run / ref, "scattered_vs_copy": scat / ref,
            "scattered_vs_run": scat / run, "run_ge_50pct": run >= 0.5 * ref,
            "scattered_ge_50pct": scat >= 0.5 * ref, "scattered_within_20pct": scat >= 0.8 * run}


def format_table(rows: list[dict], ok: dict) -> str:
    lines = ["| shape | case | pages | page bytes | MiB | ms | GB/s | % of copy_ | CPU ms/call "
             "| launch ms |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ref = {r["shape"]: r["gbps"] for r in rows if r["case"] == "torch copy_ (this process)"}
    for r in rows:
        lines.append(f"| {r['shape']} | {r['case']} | {r['pages']} | {r['page_bytes']:,} | "
                     f"{r['bytes'] / 2**20:.1f} | {r['ms']:.3f} | {r['gbps']:.0f} | "
                     f"{100 * r['gbps'] / ref[r['shape']]:.0f}% | "
                     f"{'-' if r['cpu_ms'] is None else format(r['cpu_ms'], '.3f')} | "
                     f"{format(r['launch_ms'], '.3f') if 'launch_ms' in r else '-'} |")
    lines.append("")
    lines.append(f"{ok['shape']}: contiguous run at {ok['run_vs_copy']:.0%} of copy_, scattered "
                 f"at {ok['scattered_vs_copy']:.0%} (goal >= 50%: "
                 f"{'met' if ok['scattered_ge_50pct'] and ok['run_ge_50pct'] else 'NOT met'}); "
                 f"scattered/run {ok['scattered_vs_run']:.2f} (goal >= 0.80: "
                 f"{'met' if ok['scattered_within_20pct'] else 'NOT met'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=256, help="pages per case (default 256)")
    ap.add_argument("--min-seconds", type=float, default=0.5, help="timing per case")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " +
                    ", ".join(SHAPES))
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("ipc_bench: needs a CUDA GPU (torch.cuda.is_available() is False here)")
    rows: list[dict] = []
    for name in a.shapes.split(","):
        rows += bench_shape(name, SHAPES[name], a.pages, a.min_seconds)
    ok = checks(rows)
    if a.json:
        print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                          "rows": rows, "checks": ok}, indent=1))
    else:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
        print(format_table(rows, ok))


if __name__ == "__main__":
    main()
