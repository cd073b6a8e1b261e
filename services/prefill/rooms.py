"""The prefill worker's room table (plain Python, thread-safe, no grpc, no torch).

A room is created by whichever arrives first, the gateway's Prefill or the decode
worker's Transfer (they race by design). Its life:

    PENDING ──(Prefill + KV computed + Transfer)──▶ WRITING ──▶ DONE
        └──────────(Abort / bootstrap timeout / decode expired)──────▶ FAILED

Invariant: only the thread that moved a room to WRITING touches its KV pages until it
sets `write_done`; a failure during WRITING is recorded and acted on by that thread, so
Abort's confirmation ("aborted") always means no write into the decode worker is in flight.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

PENDING, WRITING, DONE, FAILED = "pending", "writing", "done", "failed"
# A failed or finished room id is remembered this long, so a late Transfer or
# Prefill for it fails at once instead of waiting for a partner that never comes.
TOMBSTONE_S = 600.0


@dataclass
class RoomError:
    """Why a room failed: a grpc status code name ("UNAVAILABLE") and a message."""

    code: str
    message: str


@dataclass(eq=False)
class Room:
    room: int
    decode_address: str = ""
    state: str = PENDING
    has_prefill: bool = False  # the gateway's Prefill arrived (the request is queued)
    req: Any = None  # the engine Request (PREFILL_ONLY), once queued
    first: Any = None  # the PREFILL_ONLY RequestOutput: token 1 and the KV pages
    transfer: Any = None  # the decode worker's TransferRequest
    error: RoomError | None = None
    arrival: float = field(default_factory=time.monotonic)
    prefill_done_at: float | None = None
    transfer_at: float | None = None
    result: Any = None  # (TransferStats, seconds) once DONE
    changed: threading.Condition = field(default_factory=threading.Condition)
    write_done: threading.Event = field(default_factory=threading.Event)


class RoomTable:
    """Rooms by id, plus tombstones of recently ended rooms."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rooms: dict[int, Room] = {}
        self._ended: dict[int, float] = {}

    def get_or_create(self, room: int) -> Room | None:
        """The live room, a new one, or None when the room already ended (tombstoned)."""
        with self._lock:
            self._prune()
            if room in self._ended:
                return None
            r = self._rooms.get(room)
            if r is None:
                r = self._rooms[room] = Room(room)
            return r

    def get(self, room: int) -> Room | None:
        with self._lock:
            return self._rooms.get(room)

    def remove(self, room: int) -> None:
        """Forget a room and tombstone its id."""
        with self._lock:
            self._rooms.pop(room, None)
            self._ended[room] = time.monotonic()

    def bound_for(self, decode_address: str) -> list[Room]:
        with self._lock:
            return [r for r in self._rooms.values() if r.decode_address == decode_address]

    def all(self) -> list[Room]:
        with self._lock:
            return list(self._rooms.values())

    def _prune(self) -> None:
        cutoff = time.monotonic() - TOMBSTONE_S
        for k in [k for k, t in self._ended.items() if t < cutoff]:
            del self._ended[k]


def update(room: Room, **changes: Any) -> None:
    """Set fields under the room's condition and wake every waiter."""
    with room.changed:
        for k, v in changes.items():
            setattr(room, k, v)
        room.changed.notify_all()


def fail(room: Room, code: str, message: str) -> str:
    """Mark the room failed (first error wins); returns the state it was in."""
    with room.changed:
        before = room.state
        if room.state in (PENDING, WRITING):
            room.error = room.error or RoomError(code, message)
            if room.state == PENDING:
                room.state = FAILED
        room.changed.notify_all()
        return before


def wait_for(room: Room, predicate, timeout: float | None) -> bool:
    """Wait until predicate(room) or the room failed; True when predicate holds."""
    with room.changed:
        room.changed.wait_for(lambda: predicate(room) or room.state == FAILED, timeout)
        return predicate(room) and room.state != FAILED
