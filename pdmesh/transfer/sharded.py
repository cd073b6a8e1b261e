"""KV transfer between workers whose pools are split over tensor-parallel ranks.

A worker at TP n keeps n pools (one per rank, pdmesh/runtime/tp/ranks.py), each with the
same page ids and the KV heads its rank owns: pool r is [P, L, page, 2, h_r, Dh]. Peers
see the logical pool (every head of a page, KVLayout's fields) plus each rank's share
(KVLayout.ranks: heads, base address, page bytes), from the registry or the Transfer.

A write from a prefill at TP a into a decode at TP b (either side may be 1) goes
through a staging buffer registered with the transfer engine: for each destination
rank, its heads of the room's pages are gathered from the source ranks' pools (all
mapped in the prefill's engine process) into the destination rank's own page layout,
then written by Mooncake, one descriptor per run of consecutive destination pages (a
destination rank holding exactly one source rank's heads, as at equal TP sizes, is
written straight from that rank's registered pool, no copy).
The prompt's KV therefore crosses once (each head once; a head replicated on several
destination ranks, TP b > KV heads, once per replica), in as few descriptors as TP 1.
Checksums cover the logical page (every head in order), so both sides agree
whatever their TP sizes.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

from pdmesh.transfer.base import TransferStats
from pdmesh.transfer.layout import KVRank
from pdmesh.transfer.plan import page_runs

STAGING_PAGES = 64  # logical pages per staged write (the buffer: this many pages)


def kv_rank_proto(r: KVRank) -> Any:
    """KVRank -> pdmesh.v1.KvRank."""
    from pdmesh.v1 import common_pb2

    return common_pb2.KvRank(rank=r.rank, kv_head_start=r.head_start,
                             kv_head_end=r.head_end, kv_base_address=r.kv_base,
                             bytes_per_page=r.bytes_per_page)


def kv_rank_from_proto(m: Any) -> KVRank:
    """pdmesh.v1.KvRank -> KVRank."""
    return KVRank(m.rank, m.kv_head_start, m.kv_head_end, m.kv_base_address,
                  m.bytes_per_page)


class ShardedPool:
    """The pools of one worker's ranks: `pools[r]` [P, L, page, 2, h_r, Dh] holds KV heads
    `heads[r]` = (start, end). A TP 1 worker is one pool holding every head."""

    def __init__(self, pools: Sequence[Any], heads: Sequence[tuple[int, int]]) -> None:
        self.pools, self.heads = list(pools), [tuple(h) for h in heads]
        self.num_heads = max(h[1] for h in self.heads)
        p0 = self.pools[0]
        self.page_shape = tuple(p0.shape[1:4])  # (L, page, 2)
        self.head_dim, self.dtype = int(p0.shape[5]), p0.dtype

    def gather(self, pages: Sequence[int], h0: int, h1: int, out: Any = None) -> Any:
        """KV heads [h0, h1) of `pages` -> [n, L, page, 2, h1 - h0, Dh] (into `out`), each
        head from the first rank holding it. One strided copy per rank and run of
        consecutive pages (an index_select first would copy everything twice)."""
        import torch

        n, d, rows = len(pages), self.head_dim, self.page_shape[0] * self.page_shape[1] * 2
        if out is None:
            out = torch.empty(n, *self.page_shape, h1 - h0, d, dtype=self.dtype)
        flat, done = out.view(n, rows, h1 - h0, d), h0  # a page's (layer, token, K/V) rows
        for pool, (a, b) in zip(self.pools, self.heads):
            lo, hi = max(a, done), min(b, h1)  # heads not taken from an earlier rank
            if lo >= hi:
                continue
            src = pool.view(pool.shape[0], rows, b - a, d)[:, :, lo - a:hi - a, :]
            at = 0  # index in `pages` of the run's first page
            for first, count in page_runs(pages):
                flat[at:at + count, :, lo - h0:hi - h0, :].copy_(src[first:first + count])
                at += count
            done = hi
        if done != h1:
            raise ValueError(f"no rank holds KV heads [{done}, {h1})")
        return out

    def checksum(self, pages: Sequence[int], algo: str) -> int:
        """pdmesh.transfer.checksum of the logical pages (every head) in order."""
        from pdmesh.transfer.checksum import pages_checksum

        data = self.gather(pages, 0, self.num_heads)
        return pages_checksum(data, list(range(len(pages))), algo)


class ShardedRouter:
    """The Router's interface (pdmesh.transfer.route) for a prefill whose pool is split
    over TP ranks, or writing to a decode whose pool is: such writes are staged per
    destination rank and sent by the transfer engine; any other goes to `inner`."""

    def __init__(self, inner: Any, transport: Any, src: ShardedPool, sharded_src: bool,
                 logical_bpp: int, check: Callable[[], None] | None = None,
                 src_bases: Sequence[int] | None = None) -> None:
        """`check()`: raises when a source rank has died (its pool, still mapped here,
        is no longer trusted: the write fails instead of sending it). `src_bases`: each
        source rank's pool as registered with `transport`, so a destination rank holding
        exactly one source rank's heads (equal TP sizes) is written from it directly."""
        self.inner, self.transport, self.src = inner, transport, src
        self.sharded_src, self.logical_bpp, self.check = sharded_src, logical_bpp, check
        self.src_bases = list(src_bases) if src_bases else []
        self._staging: Any = None
        self._staging_base = 0
        self._lock = threading.Lock()  # one staged write at a time (one buffer)

    def _sharded(self, dst: Any) -> bool:
        return self.sharded_src or bool(dst.ranks)

    def _ranks(self, dst: Any) -> tuple[KVRank, ...]:
        return dst.ranks or (KVRank(0, 0, self.src.num_heads, dst.kv_base, self.logical_bpp),)

    def _direct(self, r: KVRank) -> int | None:
        """The registered source pool holding exactly r's heads, if any."""
        for base, heads in zip(self.src_bases, self.src.heads):
            if heads == (r.head_start, r.head_end):
                return base
        return None

    def write_pages(self, dst: Any, src_pages: Sequence[int],
                    dst_pages: Sequence[int]) -> TransferStats:
        """Local src_pages[i] (every head) over dst's dst_pages[i]; blocks."""
        if not self._sharded(dst):
            return self.inner.write_pages(dst, src_pages, dst_pages)
        if len(src_pages) != len(dst_pages):
            raise ValueError(f"{len(src_pages)} source pages for {len(dst_pages)} destinations")
        t0, nbytes, desc = time.perf_counter(), 0, 0
        if self.check is not None:
            self.check()
        for r in self._ranks(dst):
            base = self._direct(r)
            st = (self.transport.write_pages(dst.session_id, base, r.kv_base, r.bytes_per_page,
                                             src_pages, dst_pages)
                  if base is not None else self._staged(dst, r, src_pages, dst_pages))
            nbytes, desc = nbytes + st.bytes, desc + st.descriptors
        return TransferStats(nbytes, desc, time.perf_counter() - t0, "mooncake")

    def _staged(self, dst: Any, r: KVRank, src_pages: Sequence[int],
                dst_pages: Sequence[int]) -> TransferStats:
        """r's heads of the pages, gathered into the staging buffer, STAGING_PAGES at a time."""
        nbytes, desc = 0, 0
        with self._lock:
            staging = self._buffer()
            for at in range(0, len(src_pages), STAGING_PAGES):
                src, dpages = src_pages[at:at + STAGING_PAGES], dst_pages[at:at + STAGING_PAGES]
                view = staging[:len(src) * r.bytes_per_page].view(self.src.dtype).view(
                    len(src), *self.src.page_shape, r.head_end - r.head_start, self.src.head_dim)
                self.src.gather(src, r.head_start, r.head_end, out=view)
                st = self.transport.write_pages(dst.session_id, self._staging_base, r.kv_base,
                                                r.bytes_per_page, range(len(src)), dpages)
                nbytes, desc = nbytes + st.bytes, desc + st.descriptors
        return TransferStats(nbytes, desc, 0.0, "mooncake")

    def _buffer(self) -> Any:
        if self._staging is None:  # first staged write: STAGING_PAGES logical pages
            import torch

            self._staging = torch.empty(STAGING_PAGES * self.logical_bpp, dtype=torch.uint8)
            self._staging_base = self.transport.register(self._staging)
        return self._staging

    def read_pages(self, dst: Any, dst_pages: Sequence[int]) -> Any:
        """dst's logical pages (every head, each from the first rank holding it), uint8
        [n, logical bytes per page]; blocks."""
        import torch

        if not self._sharded(dst):
            return self.inner.read_pages(dst, dst_pages)
        read = getattr(self.transport, "read_pages", None)
        if read is None:  # e.g. a staged transport: the decode alone verifies
            raise NotImplementedError(f"{type(self.transport).__name__} cannot read pages")
        pools, heads = [], []
        for r in self._ranks(dst):
            raw = read(dst.session_id, r.kv_base, r.bytes_per_page, list(dst_pages))
            pools.append(raw.view(self.src.dtype).view(len(dst_pages), *self.src.page_shape,
                                                       r.head_end - r.head_start, -1))
            heads.append((r.head_start, r.head_end))
        rows = list(range(len(dst_pages)))
        data = ShardedPool(pools, heads).gather(rows, 0, self.src.num_heads)
        return data.view(torch.uint8).view(len(dst_pages), -1)

    def checksum_pages(self, dst: Any, dst_pages: Sequence[int], algo: str) -> int:
        if not self._sharded(dst):
            return self.inner.checksum_pages(dst, dst_pages, algo)
        from pdmesh.transfer.checksum import pages_checksum

        raw = self.read_pages(dst, dst_pages)
        data = raw.view(self.src.dtype).view(len(dst_pages), *self.src.page_shape,
                                             self.src.num_heads, self.src.head_dim)
        return pages_checksum(data, list(range(len(dst_pages))), algo)

    def corrupt_page(self, dst: Any, src_page: int, dst_page: int) -> None:
        if self._sharded(dst):
            raise NotImplementedError("the corrupt-KV chaos hook needs TP 1 on both sides")
        self.inner.corrupt_page(dst, src_page, dst_page)

    @property
    def algo(self) -> str:
        return self.inner.algo

    def source_checksum(self, pages: Sequence[int], algo: str) -> int:
        if self.sharded_src:
            return self.src.checksum(pages, algo)
        return self.inner.source_checksum(pages, algo)

    def route_name(self, dst: Any) -> str | None:
        return "mooncake" if self._sharded(dst) else self.inner.route_name(dst)

    def forget(self, session_id: str) -> None:
        self.inner.forget(session_id)

    def close(self) -> None:
        self.inner.close()


__all__ = ["ShardedPool", "ShardedRouter", "kv_rank_proto", "kv_rank_from_proto"]
