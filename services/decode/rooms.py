"""The decode worker's rooms and quarantine (plain Python, thread-safe, no grpc).

A room goes: pre-allocation queue → pages held → Transfer sent → KV arrived (adopted,
decoding) → finished. `closed` is set exactly once, by whoever cleans the room up;
`transfer_sent` and `kv_done` are read and written under `lock` together with it, so a
cleanup can tell whether a prefill may still be writing into the room's pages.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any


class RoomFailed(Exception):
    """A room ends with this grpc status code name and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(eq=False)
class DecodeRoom:
    room: int
    prefill_address: str  # "" when colocated
    outputs: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # RequestOutput | None
    wake: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pages: list[int] | None = None  # held pages, once out of the pre-allocation queue
    error: RoomFailed | None = None  # set by cancel, abort or a peer's expiry
    transfer_sent: bool = False
    kv_done: bool = False  # Transfer answered OK: no write of this room is in flight
    finished: bool = False  # the engine finished it (its pages are already free)
    closed: bool = False

    @property
    def request_id(self) -> str:
        return str(self.room)

    def fail(self, code: str, message: str) -> None:
        """Record the first error and wake the thread serving the room."""
        with self.lock:
            self.error = self.error or RoomFailed(code, message)
        self.wake.set()
        self.outputs.put(None)


class DecodeRooms:
    """Live rooms by id, and quarantined request ids with their prefill and page count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rooms: dict[int, DecodeRoom] = {}
        self._quarantine: dict[str, tuple[str, int]] = {}

    def add(self, room: int, prefill_address: str) -> DecodeRoom | None:
        """A new room, or None when one with this id is live."""
        with self._lock:
            if room in self._rooms:
                return None
            r = self._rooms[room] = DecodeRoom(room, prefill_address)
            return r

    def get(self, room: int) -> DecodeRoom | None:
        with self._lock:
            return self._rooms.get(room)

    def remove(self, room: int) -> None:
        with self._lock:
            self._rooms.pop(room, None)

    def waiting_on(self, prefill_address: str) -> list[DecodeRoom]:
        """Rooms whose KV is still to come from `prefill_address`."""
        with self._lock:
            return [r for r in self._rooms.values()
                    if r.prefill_address == prefill_address and not r.kv_done]

    def quarantine(self, request_id: str, prefill_address: str, num_pages: int) -> None:
        with self._lock:
            self._quarantine[request_id] = (prefill_address, num_pages)

    def release(self, request_id: str) -> bool:
        """Take a request out of quarantine; True when it was there."""
        with self._lock:
            return self._quarantine.pop(request_id, None) is not None

    def quarantined(self) -> dict[str, tuple[str, int]]:
        with self._lock:
            return dict(self._quarantine)

    def quarantined_pages(self) -> int:
        with self._lock:
            return sum(n for _, n in self._quarantine.values())

    def all(self) -> list[Any]:
        with self._lock:
            return list(self._rooms.values())
