"""Follows the registry's `Watch` stream on an asyncio event loop (one task, no thread).

    watch = RegistryWatch("registry:50050", on_event)   # on_event(type_name, WorkerInfo)
    watch.start()                      # inside the running event loop
    watch.is_gone("10.0.0.7:40123")    # expired or left, and not back since
    await watch.close()

On a broken stream it reconnects every `retry_s`. On every new stream it first calls
`on_sync(members)` with the registry's member list (read after the stream opened, so no
change falls between the two): a follower that was cut off can drop the members that
vanished meanwhile (after a registry restart every worker re-registers under a new
id). The stream's own opening JOINED events and later changes follow.
One client for every follower of the registry: the gateway's pool and the workers.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import grpc

from pdmesh import auth
from pdmesh.v1 import registry_pb2 as rpb
from pdmesh.v1 import registry_pb2_grpc as rpb_grpc

log = logging.getLogger(__name__)
OnEvent = Callable[[str, rpb.WorkerInfo], None]
OnSync = Callable[[list[rpb.WorkerInfo]], None]
GONE = ("EXPIRED", "LEFT")


class RegistryWatch:
    """One Watch stream kept open; remembers which addresses are gone."""

    def __init__(self, registry_addr: str, on_event: OnEvent | None = None,
                 retry_s: float = 0.5, on_sync: OnSync | None = None) -> None:
        self._addr, self._on_event, self._retry_s = registry_addr, on_event, retry_s
        self._on_sync = on_sync
        self._gone: dict[str, float] = {}  # address -> when it expired or left
        self._task: asyncio.Task | None = None
        self._channel: grpc.aio.Channel | None = None

    def start(self) -> "RegistryWatch":
        self._task = asyncio.ensure_future(self._run())
        return self

    def is_gone(self, address: str) -> bool:
        """True when `address` expired or left and has not registered again."""
        return address in self._gone

    async def _run(self) -> None:
        while True:
            self._channel = auth.aio_insecure_channel(self._addr)  # with the cluster token
            stub = rpb_grpc.RegistryStub(self._channel)
            try:
                call = stub.Watch(rpb.WatchRequest(), wait_for_ready=True)
                if self._on_sync is not None:
                    members = await stub.ListWorkers(rpb.ListWorkersRequest(), timeout=10,
                                                     wait_for_ready=True)
                    self._on_sync(list(members.workers))
                async for ev in call:
                    self._handle(ev)
            except grpc.aio.AioRpcError as e:
                log.warning("registry watch failed (%s); retrying", e.code())
            finally:
                await self._channel.close()
            await asyncio.sleep(self._retry_s)

    def _handle(self, ev: rpb.WorkerEvent) -> None:
        name, addr = rpb.WorkerEvent.Type.Name(ev.type), ev.worker.address
        if name == "JOINED":
            self._gone.pop(addr, None)
        elif name in GONE:
            self._gone[addr] = time.monotonic()
        if self._on_event is not None:
            try:
                self._on_event(name, ev.worker)
            except Exception:  # a bug in a handler must not stop the watch
                log.exception("watch handler failed for %s %s", name, addr)

    def cancel(self) -> None:
        """Stop following (from the event loop's thread); `close` also waits for it."""
        if self._task is not None:
            self._task.cancel()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
