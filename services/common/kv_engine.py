"""A decode's transfer engine on demand: started before its first Transfer request to a
prefill that will write through it (pdmesh.transfer.lazy: a prefill on another host,
or one without a same-host path), never for one that writes by shared memory or IPC.

The decode learns each prefill's host and same-host paths from the registry (its Watch
events; a prefill it has not heard of yet is looked up with ListWorkers, and started
for if still unknown). Once started, every Transfer request carries the engine's session
and pool base; the registry keeps the id published at start (same peer_key).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Sequence

from pdmesh import auth
from pdmesh.registry_watch import GONE
from pdmesh.transfer.lazy import engine_started, needs_engine
from pdmesh.v1 import registry_pb2 as rpb
from pdmesh.v1 import registry_pb2_grpc as rpb_grpc

log = logging.getLogger(__name__)


class EngineGate:
    """Per prefill address: whether this worker's engine must run first; starts it once.

    kv_op(op, args): the core's KV data-plane call (pdmesh.worker.core.KV_OPS), blocking.
    """

    def __init__(self, kv_op: Callable[[str, tuple], Any], session_id: str, kv_base: int,
                 host_id: str, local_paths: Sequence[str], registry: str = "") -> None:
        """`local_paths`: this worker's published same-host URIs (route.local_endpoints)."""
        self._kv_op, self.session_id, self.kv_base = kv_op, session_id, kv_base
        self._host, self._registry = host_id, registry
        self._local = list(local_paths)
        # address -> (host id, its same-host URIs)
        self._peers: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._lock = asyncio.Lock()

    @property
    def started(self) -> bool:
        return engine_started(self.session_id)

    def observe(self, name: str, info: Any) -> None:
        """A registry Watch event (type name, WorkerInfo)."""
        if name in GONE:
            self._peers.pop(info.address, None)
        elif info.HasField("transfer"):
            self._peers[info.address] = (info.transfer.host_id,
                                         tuple(info.transfer.local_endpoints))

    async def endpoint(self, prefill: str) -> tuple[str, int]:
        """(session id, pool base) to send prefill `prefill`, the engine started first
        when that prefill needs it."""
        if self.started:
            return self.session_id, self.kv_base
        if prefill not in self._peers and self._registry:
            await self._lookup()
        host, local = self._peers.get(prefill, (None, ()))
        if needs_engine(self._host, self._local, host, local):
            async with self._lock:
                if not self.started:
                    why = (f"prefill {prefill} on another host" if host and host != self._host
                           else f"no same-host path opens to prefill {prefill}" if host
                           else f"prefill {prefill} not in the registry")
                    self.session_id, self.kv_base = await asyncio.to_thread(
                        self._kv_op, "start_engine", (why,))
        return self.session_id, self.kv_base

    async def _lookup(self) -> None:
        """Learn every registered worker's host (a prefill the Watch has not shown yet)."""
        try:
            async with auth.aio_insecure_channel(self._registry) as ch:
                resp = await rpb_grpc.RegistryStub(ch).ListWorkers(rpb.ListWorkersRequest(),
                                                                   timeout=5)
        except Exception as e:  # the registry is away: unknown peers start the engine
            log.warning("registry lookup of prefill hosts failed: %s", e)
            return
        for w in resp.workers:
            self.observe("JOINED", w)
