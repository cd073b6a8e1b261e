"""KV layouts and transfer between workers of different TP sizes (pdmesh/transfer/sharded.py,
KVLayout.ranks), one layer alone: the transfer engine is replaced by a memcpy between
registered addresses in this process, so every byte's destination is checked.

A prefill at TP a writes a room's pages into a decode at TP b: each destination rank ends
up with exactly its KV heads of those pages (the logical pages equal the source's, the
other pages untouched), the bytes sent are the pages' logical size (each head once)
unless the decode replicates heads, and both sides' checksums of the logical pages agree.
"""
from __future__ import annotations

import ctypes
import dataclasses

import pytest
import torch

from pdmesh.transfer.base import TransferStats
from pdmesh.transfer.layout import KVLayout, KVRank, check_compatible
from pdmesh.transfer.route import Destination
from pdmesh.transfer.sharded import (ShardedPool, ShardedRouter, kv_rank_from_proto,
                                     kv_rank_proto)

L, PAGE, HKV, DH, PAGES = 2, 4, 4, 8, 12
LOGICAL_BPP = L * PAGE * 2 * HKV * DH * 4


class MemcpyTransport:
    """The transfer engine's write/read/register, as memcpy between this process's
    addresses (a unit-test stand-in for Mooncake: same arguments, same page math)."""

    def __init__(self) -> None:
        self.kept: list[torch.Tensor] = []

    def register(self, t: torch.Tensor) -> int:
        self.kept.append(t)
        return t.data_ptr()

    def write_pages(self, session, src_base, dst_base, bpp, src_pages, dst_pages):
        for s, d in zip(src_pages, dst_pages):
            ctypes.memmove(dst_base + d * bpp, src_base + s * bpp, bpp)
        return TransferStats(bpp * len(src_pages), len(src_pages), 0.0, "mooncake")

    def read_pages(self, session, base, bpp, pages):
        out = torch.empty(len(pages), bpp, dtype=torch.uint8)
        for i, p in enumerate(pages):
            ctypes.memmove(out[i].data_ptr(), base + p * bpp, bpp)
        return out


def heads_of(tp: int) -> list[tuple[int, int]]:
    """TPPlan's KV-head rule: HKV / tp each, or one replicated head when tp > HKV."""
    if tp > HKV:
        return [(r // (tp // HKV), r // (tp // HKV) + 1) for r in range(tp)]
    n = HKV // tp
    return [(r * n, (r + 1) * n) for r in range(tp)]


def rank_pools(tp: int, seed: int | None) -> ShardedPool:
    """A worker at TP `tp`: per-rank pools with the heads of one logical random pool
    (seed), or zeros (None)."""
    g = torch.Generator().manual_seed(seed or 0)
    logical = (torch.randn(PAGES, L, PAGE, 2, HKV, DH, generator=g) if seed is not None
               else torch.zeros(PAGES, L, PAGE, 2, HKV, DH))
    return ShardedPool([logical[..., a:b, :].contiguous() for a, b in heads_of(tp)],
                       heads_of(tp))


def destination(pool: ShardedPool, transport: MemcpyTransport, tp: int) -> Destination:
    if tp == 1:
        return Destination("decode:1", transport.register(pool.pools[0]))
    ranks = tuple(KVRank(r, a, b, transport.register(p), p[0].numel() * 4)
                  for r, ((a, b), p) in enumerate(zip(pool.heads, pool.pools)))
    return Destination("decode:1", ranks[0].kv_base, ranks=ranks)


class NoInner:
    """The TP 1 Router: must not be used when either side is split."""
    algo = "xxh3"

    def __getattr__(self, name):
        raise AssertionError(f"the TP 1 router was used ({name})")


@pytest.mark.parametrize("src_tp, dst_tp", [(2, 1), (1, 2), (4, 2), (2, 4), (4, 1), (2, 8),
                                            (2, 2), (4, 4)])
def test_each_decode_rank_gets_exactly_its_heads(src_tp, dst_tp):
    transport = MemcpyTransport()
    src, dst = rank_pools(src_tp, seed=1), rank_pools(dst_tp, seed=None)
    bases = [transport.register(p) for p in src.pools] if src_tp > 1 else None
    router = ShardedRouter(NoInner(), transport, src, src_tp > 1, LOGICAL_BPP, src_bases=bases)
    d = destination(dst, transport, dst_tp)
    src_pages, dst_pages = [3, 4, 5, 9], [7, 8, 0, 2]  # runs on both sides, unordered
    stats = router.write_pages(d, src_pages, dst_pages)
    want = src.gather(src_pages, 0, HKV)
    assert torch.equal(dst.gather(dst_pages, 0, HKV), want)
    for pool, (a, b) in zip(dst.pools, dst.heads):  # every replica too
        assert torch.equal(pool[dst_pages], want[..., a:b, :])
        others = [p for p in range(PAGES) if p not in dst_pages]
        assert not pool[others].any(), "a page outside the room was written"
    replicas = max(1, dst_tp // HKV)
    assert stats.bytes == len(src_pages) * LOGICAL_BPP * replicas
    # equal head splits go rank to rank from the registered pools: no staging copy
    assert (router._staging is None) == (src_tp == dst_tp)
    # both sides digest the logical pages (a TP 1 source: the ordinary router's digest)
    src_sum = router.source_checksum(src_pages, "xxh3") if src_tp > 1 else \
        src.checksum(src_pages, "xxh3")
    assert src_sum == dst.checksum(dst_pages, "xxh3") == router.checksum_pages(d, dst_pages,
                                                                                "xxh3")


def test_tp1_to_tp1_goes_to_the_ordinary_router():
    calls = []

    class Inner:
        def write_pages(self, dst, s, d):
            calls.append((s, d))
            return TransferStats(1, 1, 0.0, "shm")

    router = ShardedRouter(Inner(), MemcpyTransport(), rank_pools(1, seed=1), False,
                           LOGICAL_BPP)
    assert router.write_pages(Destination("d:1", 0), [1], [2]).path == "shm"
    assert calls == [([1], [2])] and router._staging is None  # no buffer at TP 1


def layout(ranks=()) -> KVLayout:
    return KVLayout("m", "float32", PAGE, L, HKV, DH, LOGICAL_BPP, PAGES, ranks=ranks)


def test_bind_check_knows_tp():
    bpp = LOGICAL_BPP // 2
    good = (KVRank(0, 0, 2, 1000, bpp), KVRank(1, 2, 4, 9000, bpp))
    check_compatible(layout(), layout(good), [0, 1])
    with pytest.raises(ValueError, match="not all 4"):
        check_compatible(layout(), layout(good[:1]))
    with pytest.raises(ValueError, match="bytes per page"):
        check_compatible(layout(), layout((good[0], dataclasses.replace(good[1],
                                                                         bytes_per_page=bpp + 4))))
    with pytest.raises(ValueError, match="outside the 4 heads"):
        check_compatible(layout(), layout((good[0], KVRank(1, 2, 5, 9000, bpp))))


def test_rank_layout_round_trips_through_dict_and_proto():
    ranks = (KVRank(0, 0, 2, 1 << 40, 2048), KVRank(1, 2, 4, (1 << 40) + 4096, 2048))
    lay = layout(ranks)
    assert KVLayout.from_dict(lay.to_dict()) == lay
    assert KVLayout.from_dict(layout().to_dict()).ranks == ()
    assert tuple(kv_rank_from_proto(kv_rank_proto(r)) for r in ranks) == ranks


def test_a_dead_source_rank_fails_the_write_before_any_byte_moves():
    transport = MemcpyTransport()
    dst = rank_pools(1, seed=None)

    def dead() -> None:
        raise RuntimeError("tensor-parallel rank 1 (pid 7) exited with code -9")

    router = ShardedRouter(NoInner(), transport, rank_pools(2, seed=1), True, LOGICAL_BPP,
                           check=dead)
    with pytest.raises(RuntimeError, match="rank 1"):
        router.write_pages(destination(dst, transport, 1), [0, 1], [2, 3])
    assert not dst.pools[0].any()
