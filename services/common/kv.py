"""The P/D protocol's data-plane ports over pdmesh's KV paths (shm, ipc, Mooncake).

`TransportWriter.write` runs the blocking page write on a small pool of writer threads,
so the event loop never blocks while bytes move. Writes are one-sided and never wait
on a peer, so the pool only orders them: a queued write is a wait the operator sees
(`pdmesh_prefill_kv_writes_queued` and a log line), never a deadlock.
"""
from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from pdmesh.disagg.ports import TransferTarget
from pdmesh.telemetry import tracing
from pdmesh.transfer.route import Destination

log = logging.getLogger(__name__)
# Writer threads: enough to keep a NIC busy with several rooms at once. env override.
WRITER_THREADS = int(os.environ.get("PDMESH_KV_WRITER_THREADS", "4"))


class TransportWriter:
    """KVWriter (pdmesh.disagg.ports) over a Router (pdmesh.transfer.route): each decode
    pool is reached by the path chosen when the pair bound; counts into WorkerMetrics."""

    def __init__(self, router: Any, metrics: Any, threads: int = WRITER_THREADS) -> None:
        self.router, self.metrics, self.threads = router, metrics, threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kv-write")
        self.in_flight = 0  # writes submitted and not finished (running + queued)

    @property
    def queued(self) -> int:
        return max(0, self.in_flight - self.threads)

    async def write(self, src_pages: Sequence[int], target: TransferTarget) -> Any:
        """Write src_pages into target's pages; TransferStats; raises on failure."""
        if self.router is None:
            raise RuntimeError("this worker has no KV transport")
        dst = Destination(target.session_id, target.kv_base, target.host_id,
                          tuple(target.local_endpoints))
        attrs = {"pdmesh.room": str(target.room), "pdmesh.kv.pages": len(src_pages),
                 "pdmesh.kv.destination": target.session_id}
        with tracing.span("kv.transfer", **attrs) as sp:
            self.in_flight += 1
            if self.in_flight > self.threads:
                log.info("KV write queued: %d writes in flight on %d writer threads",
                         self.in_flight, self.threads)
            try:
                stats = await asyncio.get_running_loop().run_in_executor(
                    self._pool, self.router.write_pages, dst, list(src_pages),
                    list(target.page_ids))
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

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        if self.router is not None:
            self.router.close()


class TransportReceiver:
    """KVReceiver over `transport`: lands staged pages (host mirror -> device) off the
    event loop; a no-op for transports that write straight into the pool."""

    def __init__(self, transport: Any) -> None:
        self._land = getattr(transport, "land", None)

    async def land(self, pages: Sequence[int], path: str) -> None:
        # local paths (shm, ipc) write the pool itself, never the staged mirror
        if self._land is not None and path in ("mooncake", ""):
            await asyncio.to_thread(self._land, list(pages))
