"""KV transfer from a prefill at TP a into a decode at TP 1, by Mooncake (tcp loopback): the
staging layout pdmesh uses (pdmesh/transfer/sharded.py) against head-slice descriptors.

    python benchmarks/tp_kv_transfer.py [--tp 3] [--pages 64] [--dtype bfloat16] [--rounds 5]
        [--no-slices]

The source is `tp` rank pools of SmolLM2-135M's geometry (30 layers x 16 tokens x K/V x
3 KV heads x 64), each holding its KV heads of every page, registered here; the
destination a TP 1 pool in a child process (pdmesh.transfer.peer). Two ways to write
`pages` scattered pages:
  staged   per destination rank: gather its heads of the pages into a registered staging
           buffer in its page layout (torch copies), then one descriptor per run of
           destination pages (ShardedRouter.write_pages)
  slices   no copy: one descriptor per (source rank, page, layer, token, K/V), each the
           rank's heads (h x Dh elements) at their offset in the destination page
  tp1      the baseline: the same pages from one TP 1 pool holding every head (no gather)
All must leave the same bytes (every destination page checked by digest); the median
call's wall time and GB/s (1e9 B/s) are printed, with the descriptor counts.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pdmesh.transfer import get_transport
from pdmesh.transfer.peer import PoolPeer, tensor_page_digests
from pdmesh.transfer.route import Destination
from pdmesh.transfer.sharded import ShardedPool, ShardedRouter

L, PAGE, HKV, DH = 30, 16, 3, 64
BATCH = 1024


def rank_pools(tp: int, pages: int, dtype: torch.dtype) -> tuple[torch.Tensor, ShardedPool]:
    """A random logical pool and its split over `tp` ranks (tp divides HKV)."""
    logical = torch.randn(pages, L, PAGE, 2, HKV, DH).to(dtype)
    n = HKV // tp
    heads = [(r * n, (r + 1) * n) for r in range(tp)]
    return logical, ShardedPool([logical[..., a:b, :].contiguous() for a, b in heads], heads)


def slice_descriptors(src: ShardedPool, bases: list[int], dst_base: int, src_pages, dst_pages):
    """One descriptor per (rank, page, layer, token, K/V): the rank's heads."""
    el = src.pools[0].element_size()
    row = HKV * DH * el  # one (layer, token, K/V) row of the logical page
    bpp = L * PAGE * 2 * row
    s, d, n = [], [], []
    for base, (a, b) in zip(bases, src.heads):
        rrow = (b - a) * DH * el
        rbpp = L * PAGE * 2 * rrow
        for sp, dp in zip(src_pages, dst_pages):
            for i in range(L * PAGE * 2):
                s.append(base + sp * rbpp + i * rrow)
                d.append(dst_base + dp * bpp + i * row + a * DH * el)
                n.append(rrow)
    return s, d, n


def timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--pages", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-slices", dest="slices", action="store_false",
                   help="skip the head-slice row (seconds per call)")
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    logical, src = rank_pools(a.tp, a.pages, dtype)
    local = get_transport("mooncake")()
    bases = [local.register(pool) for pool in src.pools]
    peer = PoolPeer.start(2 * a.pages, (L, PAGE, 2, HKV, DH), dtype=a.dtype)
    bpp = peer.bytes_per_page
    src_pages = list(range(a.pages))
    dst_pages = list(range(2 * a.pages))[::2]  # scattered: a run of one page each
    want = tensor_page_digests(logical)
    router = ShardedRouter(None, local, src, True, bpp)
    dst = Destination(peer.session_id, peer.base)
    s, d, n = slice_descriptors(src, bases, peer.base, src_pages, dst_pages)
    engine = local._live()
    whole = local.register(logical)

    def tp1() -> None:
        local.write_pages(peer.session_id, whole, peer.base, bpp, src_pages, dst_pages)

    def staged() -> None:
        router.write_pages(dst, src_pages, dst_pages)

    def slices() -> None:  # batches of BATCH descriptors (Mooncake refuses huge ones)
        for i in range(0, len(s), BATCH):
            rc = engine.batch_transfer_sync_write(peer.session_id, s[i:i + BATCH],
                                                  d[i:i + BATCH], n[i:i + BATCH])
            assert rc == 0, rc
    try:
        rows = [("tp1", tp1, a.pages), ("staged", staged, a.pages), ("slices", slices, len(s))]
        for name, fn, desc in rows[:None if a.slices else 2]:
            peer.reset()
            fn()
            got = peer.digests()
            assert [got[p] for p in dst_pages] == want, f"{name}: wrong bytes"
            sec = timed(fn, a.rounds)
            mb = a.pages * bpp
            print(f"{name:7s} TP {1 if name == 'tp1' else a.tp} -> 1, {a.pages} pages x {bpp} B ({a.dtype}): "
                  f"{desc} descriptors, {sec * 1e3:.1f} ms, {mb / sec / 1e9:.2f} GB/s")
    finally:
        peer.stop()
        local.close()


if __name__ == "__main__":
    main()
