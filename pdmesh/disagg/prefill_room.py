"""One prefill room's state and the prefill worker's counters (plain data, no logic
beyond the change event).

A room is `PENDING -> WRITING -> DONE`, or `FAILED` (pdmesh/disagg/prefill.py drives it).
Its fields are filled in as its two halves arrive: the gateway's Prefill (`has_prefill`,
`req`, then `first` once computed) and the decode's Transfer (`target`). Waiters sleep
on `changed` (rooms.wait_until); every writer calls `notify()` after a change.
"""
from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import Any

from pdmesh.disagg.ports import KVChecksum, RoomError, TransferTarget


class State(enum.Enum):
    PENDING = "pending"
    WRITING = "writing"
    DONE = "done"
    FAILED = "failed"


@dataclass(eq=False)
class PrefillRoom:
    room: int
    decode_address: str = ""
    state: State = State.PENDING
    has_prefill: bool = False  # the gateway's Prefill arrived
    need: int = 0  # pages its prompt takes here
    ahead: bool = False  # queued/computed before its Transfer: counts in the budget
    queued: bool = False  # added to the engine (its pages are the engine's to free)
    req: Any = None  # the engine request, once made
    first: Any = None  # its PREFILL_ONLY output: token 1 and the KV pages
    target: TransferTarget | None = None  # from the decode's Transfer
    error: RoomError | None = None
    stats: Any = None  # TransferStats once written
    checksum: KVChecksum | None = None  # of its source pages, once verified
    arrival: float = field(default_factory=time.monotonic)
    prefill_done_at: float | None = None
    transfer_at: float | None = None
    write_s: float | None = None  # the write step as a whole: path bind, write, integrity
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    write_done: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        """Wake every waiter (rooms.wait_until); each then waits on a fresh event."""
        self.changed.set()
        self.changed = asyncio.Event()

    @property
    def failed(self) -> bool:
        return self.state is State.FAILED or self.error is not None


@dataclass
class PrefillCounters:
    transferred: int = 0
    failed: int = 0
    bootstrap_timeouts: int = 0
    deferred: int = 0  # rooms that waited for their Transfer before computing
    integrity_retries: int = 0  # rewrites after a destination checksum mismatch
    integrity_failures: int = 0  # rooms failed: the rewrite mismatched too
