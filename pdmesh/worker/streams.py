"""One request's outputs as seen from asyncio (plain Python: no torch, no grpc).

The engine loop hands over outputs once per step; a consumer that is slower than the
loop gets everything that piled up in one `next_batch()`, so a slow stream never slows
the engine and never makes it wait.
"""
from __future__ import annotations

import asyncio
import collections
from typing import Any


class StreamClosed(Exception):
    """The stream ended without a finished output (aborted or failed)."""


class EngineFailed(StreamClosed):
    """The engine under the stream failed (EngineLoop.error): nothing more will come."""


class OutputStream:
    """Outputs of one request, in order; `close(error)` ends it early. Single consumer,
    all methods on the event loop's thread. A request of n sequences (n > 1,
    runtime/fork.py) has one stream for all of them: `ids` are their request ids, and it
    is finished once each has delivered its finished output."""

    def __init__(self, ids: tuple[str, ...] = ()) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._ready = asyncio.Event()
        self._error: BaseException | None = None
        self.ids = ids
        self._left = max(len(ids), 1)  # sequences still to finish
        self.finished = False  # every sequence's finished output was delivered

    def put(self, out: Any) -> None:
        if self._error is None and not self.finished:
            self._items.append(out)
            if getattr(out, "finished", False):
                self._left -= 1
                self.finished = self._left == 0
            self._ready.set()

    def close(self, error: BaseException) -> None:
        """End the stream: the consumer gets `error` once the items before it are read."""
        if self._error is None:
            self._error = error
            self._ready.set()

    async def next_batch(self) -> list[Any]:
        """Every output ready now (at least one); raises the close error when there are
        none left and the stream was closed."""
        while not self._items:
            if self._error is not None:
                raise self._error
            self._ready.clear()
            await self._ready.wait()
        items = list(self._items)
        self._items.clear()
        return items
