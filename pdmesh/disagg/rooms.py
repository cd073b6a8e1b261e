"""Small pieces both sides' room machines share (plain Python over asyncio)."""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

# A failed or finished room id is remembered this long, so a late Transfer or Prefill
# for it fails at once instead of waiting for a partner that never comes.
TOMBSTONE_S = 600.0


class Tombstones:
    """Ids of recently ended rooms (pruned after TOMBSTONE_S)."""

    def __init__(self, ttl_s: float = TOMBSTONE_S) -> None:
        self._ttl = ttl_s
        self._ended: dict[int, float] = {}

    def add(self, room: int) -> None:
        self._ended[room] = time.monotonic()
        if len(self._ended) % 1024 == 0:
            self._prune()

    def __contains__(self, room: int) -> bool:
        t = self._ended.get(room)
        return t is not None and time.monotonic() - t < self._ttl

    def _prune(self) -> None:
        cutoff = time.monotonic() - self._ttl
        for k in [k for k, t in self._ended.items() if t < cutoff]:
            del self._ended[k]


async def wait_until(room: Any, predicate: Callable[[], bool], timeout: float | None) -> bool:
    """Wait until predicate() holds or the room failed (`room.failed`); `room.changed`
    is the event its writers set (then replace) on every change. True when predicate
    holds and the room has not failed; False on failure or after `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not (predicate() or room.failed):
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return False
        try:
            await asyncio.wait_for(room.changed.wait(), left)
        except asyncio.TimeoutError:
            return False
    return predicate() and not room.failed
