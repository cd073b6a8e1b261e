"""The P/D protocol's data-plane ports over pdmesh's KV paths (shm, ipc, Mooncake).

`TransportWriter.write` runs the blocking page write on a small pool of writer threads,
so the event loop never blocks while bytes move. Writes are one-sided and never wait
on a peer, so the pool only orders them: a queued write is a wait the operator sees
(`pdmesh_prefill_kv_writes_queued` and a log line), never a deadlock.

KV integrity (`--kv-checksum`): the writer digests a room's source pages (`on`: also its
destination pages read back through the route, for a rewrite on a mismatch), the
receiver its own pages before adopt (`on`, `decode`), all on threads. `CorruptKV` is a chaos hook for
tests (PDMESH_CHAOS_CORRUPT_KV), off unless set at start.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from pdmesh.disagg.ports import KVChecksum, TransferTarget
from pdmesh.telemetry import tracing
from pdmesh.transfer.route import Destination

log = logging.getLogger(__name__)
# Writer threads: enough to keep a NIC busy with several rooms at once. env override.
WRITER_THREADS = int(os.environ.get("PDMESH_KV_WRITER_THREADS", "4"))


class CorruptKV:
    """Chaos hook, for tests only: after a room's first write, with `probability`, one
    byte of the room's first destination page is changed through the route (as a bad
    write or a page reused too early would leave it). `rewrites`: the integrity rewrite
    is corrupted too (so the room must fail). Decided on the event loop (no locks)."""

    def __init__(self, probability: float, rewrites: bool = False, seed: int | None = None):
        self.probability, self.rewrites = probability, rewrites
        self._rng = random.Random(seed)
        self._written: collections.OrderedDict[int, None] = collections.OrderedDict()

    def hit(self, room: int) -> bool:
        """Whether this write of `room` is to be corrupted."""
        rewrite = room in self._written
        self._written[room] = None
        if len(self._written) > 4096:  # rooms are rewritten at once or never
            self._written.popitem(last=False)
        return (not rewrite or self.rewrites) and self._rng.random() < self.probability


class TransportWriter:
    """KVWriter (pdmesh.disagg.ports) over a Router (pdmesh.transfer.route): each decode
    pool is reached by the path chosen when the pair bound; counts into WorkerMetrics.
    `checksum`: "on" (digest the source, read the destination back), "decode" (digest
    the source only: the decode verifies) or "off"; `chaos`: a CorruptKV or None;
    `faults`: the process's Chaos (services/common/chaos.py, --chaos) or None."""

    def __init__(self, router: Any, metrics: Any, threads: int = WRITER_THREADS,
                 checksum: str = "on", chaos: CorruptKV | None = None,
                 faults: Any = None) -> None:
        self.router, self.metrics, self.threads = router, metrics, threads
        self.checks, self.chaos = checksum != "off" and router is not None, chaos
        self.faults = faults
        self.read_back = self.checks and checksum == "on"
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kv-write")
        self.in_flight = 0  # writes submitted and not finished (running + queued)
        self._unreadable: set[str] = set()  # paths already logged as not reading back

    @property
    def queued(self) -> int:
        return max(0, self.in_flight - self.threads)

    async def write(self, src_pages: Sequence[int], target: TransferTarget) -> Any:
        """Write src_pages into target's pages; TransferStats; raises on failure."""
        if self.router is None:
            raise RuntimeError("this worker has no KV transport")
        dst = _destination(target)
        attrs = {"pdmesh.room": str(target.room), "pdmesh.kv.pages": len(src_pages),
                 "pdmesh.kv.destination": target.session_id,
                 # prompt pages the decode had already (its prefix cache): not sent
                 "pdmesh.kv.cached_pages": target.cached_pages}
        with tracing.span("kv.transfer", **attrs) as sp:
            self.in_flight += 1
            if self.in_flight > self.threads:
                log.info("KV write queued: %d writes in flight on %d writer threads",
                         self.in_flight, self.threads)
            try:
                corrupt = self.chaos is not None and self.chaos.hit(target.room)
                if self.faults is not None:  # may sleep, or raise a failed write
                    corrupt = await self.faults.kv_write(target.room) or corrupt
                stats = await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._write, dst, list(src_pages), list(target.page_ids),
                    corrupt)
            except Exception as e:
                path = self.router.route_name(dst) or "unbound"
                self.metrics.transfer_failures.labels(path).inc()
                sp.set_attributes({"pdmesh.kv.error": str(e), "pdmesh.kv.path": path})
                raise
            finally:
                self.in_flight -= 1
            sp.set_attributes({"pdmesh.kv.bytes": stats.bytes, "pdmesh.kv.path": stats.path,
                               "pdmesh.kv.descriptors": stats.descriptors,
                               "pdmesh.kv.gb_per_s": stats.gbps})
        self.metrics.transfer_bytes.labels(stats.path).inc(stats.bytes)
        self.metrics.transfer_pages.labels(stats.path).inc(len(src_pages))
        self.metrics.transfer_seconds.labels(stats.path).observe(stats.seconds)
        return stats

    def _write(self, dst: Destination, src: list[int], dst_pages: list[int],
               corrupt: bool) -> Any:
        stats = self.router.write_pages(dst, src, dst_pages)
        if corrupt and src:
            self.router.corrupt_page(dst, src[0], dst_pages[0])
            log.warning("chaos: corrupted KV page %d in %s",
                        dst_pages[0], dst.session_id)
        return stats

    async def checksum(self, src_pages: Sequence[int]) -> KVChecksum | None:
        """The checksum of local src_pages in order (on a thread); None when off."""
        if not self.checks:
            return None
        algo = self.router.algo
        return KVChecksum(algo, await asyncio.to_thread(self.router.source_checksum,
                                                        list(src_pages), algo))

    async def read_checksum(self, target: TransferTarget, algo: str | None
                            ) -> KVChecksum | None:
        """The checksum of target's pages read back through the pair's route (on a
        thread); None when read-back is off or that route cannot read pages back."""
        if not self.read_back:
            return None
        algo = algo or self.router.algo
        dst = _destination(target)
        try:
            value = await asyncio.to_thread(self.router.checksum_pages, dst,
                                            list(target.page_ids), algo)
        except NotImplementedError as e:
            path = self.router.route_name(dst) or "unbound"
            if path not in self._unreadable:
                self._unreadable.add(path)
                log.info("KV path %s cannot read pages back (%s): the decode alone "
                         "verifies the checksum", path, e)
            return None
        return KVChecksum(algo, value)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        if self.router is not None:
            self.router.close()


class TransportReceiver:
    """KVReceiver over the engine core's KV operations (`kv_op(name, args)`, blocking:
    pdmesh.worker.core.EngineCore.kv_op in this process, EngineProcess.kv_op across):
    lands staged pages (host mirror -> device) and digests the pool's pages for the
    integrity check when `checksum` is on, both off the event loop."""

    def __init__(self, kv_op: Callable[[str, tuple], Any], checksum: bool = True,
                 staged: bool = False) -> None:
        self._kv_op, self.checks, self.staged = kv_op, checksum, staged

    async def checksum(self, pages: Sequence[int], algo: str) -> KVChecksum | None:
        """The checksum of this pool's pages by `algo`, on a thread; None when off."""
        if not self.checks:
            return None
        return KVChecksum(algo, await asyncio.to_thread(self._kv_op, "checksum",
                                                        (list(pages), algo)))

    async def land(self, pages: Sequence[int], path: str) -> None:
        # local paths (shm, ipc) write the pool itself, never the staged mirror
        if self.staged and path in ("mooncake", ""):
            await asyncio.to_thread(self._kv_op, "land", (list(pages),))


def _destination(target: TransferTarget) -> Destination:
    """The route key and endpoints of a decode pool, from its Transfer target."""
    return Destination(target.session_id, target.kv_base, target.host_id,
                       tuple(target.local_endpoints),
                       tuple(getattr(target.layout, "ranks", ())))
