"""The prefill's compute-ahead budget (plain Python; one event loop, no locks).

A room may be computed before its decode has pages for it (no Transfer yet) only while
such rooms hold at most `limit` pages; other rooms wait ("deferred") for their Transfer
first. Rooms whose decode is ready never count, so they are never held back: the
prefill's pool can't fill up with KV that waits on a decode whose own pages wait on this
prefill (a circular wait when both pools are full).

Invariant: `pages` is the sum of `need` over rooms with `ahead` set; a room leaves the
budget once (its Transfer came, or it ended), and every deferred room is woken then.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from pdmesh.disagg.prefill_room import PrefillRoom

log = logging.getLogger(__name__)


class AheadBudget:
    """Pages of rooms computed ahead of their Transfer, and the rooms deferred meanwhile.
    `limit`: at most this many pages ahead (None: no limit)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.pages = 0  # pages of rooms in the budget now
        self.deferred: dict[int, PrefillRoom] = {}

    def fits(self, need: int) -> bool:
        return self.limit is None or self.pages + need <= self.limit

    def enter(self, room: PrefillRoom) -> None:
        """The room is computed before its Transfer: its pages count from now."""
        room.ahead = True
        self.pages += room.need

    def leave(self, room: PrefillRoom) -> None:
        """The room's Transfer came, or it ended: its pages no longer count, and every
        deferred room looks again whether it fits (no-op for a room not in the budget)."""
        if room.ahead:
            room.ahead = False
            self.pages -= room.need
            for r in list(self.deferred.values()):
                r.notify()

    @contextlib.contextmanager
    def deferring(self, room: PrefillRoom) -> Iterator[None]:
        """The room waits (inside the block) for its Transfer or for room in the budget."""
        if not self.deferred:
            log.info("compute-ahead budget full (%d of %d pages): rooms now wait for "
                     "their decode's Transfer before computing", self.pages, self.limit)
        self.deferred[room.room] = room
        try:
            yield
        finally:
            self.deferred.pop(room.room, None)
