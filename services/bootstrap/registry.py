"""The registry's lease table: plain Python, no grpc, clock injectable for tests.

Invariants:
- a worker is a member from `register` until `deregister` (LEFT), `expire` (EXPIRED)
  or a new `register` for the same address (LEFT for the old id, then JOINED);
- a member whose last heartbeat is `lease_s` = interval × max_failure seconds old
  or older is expired by the next `expire()` call (the server calls it on a timer);
- every watcher sees every event after its snapshot exactly once, in table order:
  events are queued under the table's lock, so no event falls between a watcher's
  snapshot and its queue.
"""
from __future__ import annotations

import dataclasses
import itertools
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from pdmesh.config import RegistryConfig

ROLES = ("PREFILL", "DECODE", "COLOCATED")
JOINED, LEFT, EXPIRED, UPDATED = "JOINED", "LEFT", "EXPIRED", "UPDATED"


@dataclass(frozen=True)
class Worker:
    """One member as the table knows it; replaced (never mutated) on every change.

    `spec` is opaque here (the server stores the RegisterRequest: KV layout,
    transfer endpoint, capacity); `load` is compared with == to detect changes.
    """

    worker_id: str
    role: str
    address: str
    model_id: str
    spec: Any = None
    load: Any = None
    registered_at: float = 0.0  # wall clock (time.time), for display
    last_heartbeat_at: float = 0.0  # wall clock (time.time), for display
    last_seen: float = 0.0  # table clock (monotonic): the lease runs on this one


@dataclass(frozen=True)
class Event:
    """A membership change: `type` is JOINED, LEFT, EXPIRED or UPDATED."""

    type: str
    worker: Worker


class Watcher:
    """A subscription: `initial` holds the members at subscription time (as JOINED
    events), then `get()` returns later events; `None` means the table closed it."""

    def __init__(self, table: "LeaseTable", role: str | None, initial: list[Event],
                 sink: Callable[[Event | None], None] | None = None) -> None:
        self._table = table
        self.role = role
        self.initial = initial
        self._queue: queue.Queue[Event | None] = queue.Queue()
        self._sink = sink or self._queue.put  # e.g. a hop onto an asyncio queue

    def wants(self, event: Event) -> bool:
        return self.role is None or event.worker.role == self.role

    def put(self, event: Event | None) -> None:
        self._sink(event)

    def get(self, timeout: float | None = None) -> Event | None:
        """Next event; raises queue.Empty after `timeout` seconds without one."""
        return self._queue.get(timeout=timeout)

    def close(self) -> None:
        """Unsubscribe (idempotent) and wake a blocked `get` with None."""
        self._table._unsubscribe(self)
        self.put(None)


class LeaseTable:
    """Members, their leases and the watchers told about changes. Thread-safe."""

    def __init__(self, config: RegistryConfig | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.config = config or RegistryConfig()
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._workers: dict[str, Worker] = {}  # insertion order = registration order
        self._watchers: list[Watcher] = []
        self._ids = itertools.count(1)
        # cumulative, under _lock (read by the metrics endpoint)
        self.counts = {"registrations": 0, "deregistrations": 0, "heartbeats": 0,
                       "missed_heartbeats": 0, "expiries": 0}

    def register(self, role: str, address: str, model_id: str, spec: Any = None,
                 load: Any = None) -> Worker:
        """Add a member and return it; ValueError naming the bad field on bad input."""
        _validate(role, address, model_id)
        now = self._clock()
        with self._lock:
            for old in [w for w in self._workers.values() if w.address == address]:
                # a restarted worker at the same address: its old incarnation is gone
                del self._workers[old.worker_id]
                self._emit(Event(LEFT, old))
            wid = f"{role.lower()}-{next(self._ids)}-{secrets.token_hex(3)}"
            wall = self._wall()
            worker = Worker(wid, role, address, model_id, spec, load, wall, wall, now)
            self._workers[wid] = worker
            self.counts["registrations"] += 1
            self._emit(Event(JOINED, worker))
            return worker

    def heartbeat(self, worker_id: str, load: Any = None) -> Worker | None:
        """Renew a lease; None when the worker is unknown (it must re-register).

        Emits UPDATED when the load differs from the last report (the gateway
        routes power_of_two / least_load on it)."""
        now = self._clock()
        with self._lock:
            old = self._workers.get(worker_id)
            if old is None:
                return None
            self.counts["heartbeats"] += 1
            # a beat after 2.6 intervals of silence means two were missed
            gap = (now - old.last_seen) / self.config.heartbeat_interval
            self.counts["missed_heartbeats"] += max(0, round(gap) - 1)
            changed = load is not None and load != old.load
            new = dataclasses.replace(old, last_seen=now, last_heartbeat_at=self._wall(),
                                      load=load if changed else old.load)
            self._workers[worker_id] = new
            if changed:
                self._emit(Event(UPDATED, new))
            return new

    def deregister(self, worker_id: str) -> bool:
        """Remove a member (LEFT); False when it was not one."""
        with self._lock:
            worker = self._workers.pop(worker_id, None)
            if worker is not None:
                self.counts["deregistrations"] += 1
                self._emit(Event(LEFT, worker))
            return worker is not None

    def expire(self) -> list[Worker]:
        """Remove every member silent for lease_s or longer (EXPIRED); return them."""
        deadline = self._clock() - self.config.lease_s
        with self._lock:
            dead = [w for w in self._workers.values() if w.last_seen <= deadline]
            for w in dead:
                del self._workers[w.worker_id]
                self.counts["expiries"] += 1
                self.counts["missed_heartbeats"] += self.config.heartbeat_max_failure
                self._emit(Event(EXPIRED, w))
            return dead

    def next_expiry_in(self) -> float:
        """Seconds until the first lease runs out (inf with no members)."""
        with self._lock:
            first = min((w.last_seen for w in self._workers.values()), default=None)
        return float("inf") if first is None else first + self.config.lease_s - self._clock()

    def extend(self, seconds: float) -> None:
        """Add `seconds` to every lease: the registry itself was not running (stopped,
        paused) for that long, so the silence is not the workers'."""
        with self._lock:
            for wid, w in self._workers.items():
                self._workers[wid] = dataclasses.replace(w, last_seen=w.last_seen + seconds)

    def snapshot(self) -> dict[str, int]:
        """The cumulative counts plus members by role ("workers_prefill", ...)."""
        with self._lock:
            snap = dict(self.counts)
            for role in ROLES:
                snap[f"workers_{role.lower()}"] = sum(
                    w.role == role for w in self._workers.values())
            return snap

    def workers(self, role: str | None = None) -> list[Worker]:
        """Current members (of `role` when given), in registration order."""
        with self._lock:
            return [w for w in self._workers.values() if role is None or w.role == role]

    def get(self, worker_id: str) -> Worker | None:
        with self._lock:
            return self._workers.get(worker_id)

    def watch(self, role: str | None = None,
              sink: Callable[[Event | None], None] | None = None) -> Watcher:
        """Subscribe; the snapshot and the subscription are taken atomically. Events go
        to `sink` when given (called under the table's lock: it must only hand over),
        else to the watcher's own queue (`get`)."""
        with self._lock:
            initial = [Event(JOINED, w) for w in self._workers.values()
                       if role is None or w.role == role]
            watcher = Watcher(self, role, initial, sink)
            self._watchers.append(watcher)
            return watcher

    def close_watchers(self) -> None:
        """End every subscription (shutdown): each watcher's `get` returns None."""
        with self._lock:
            watchers, self._watchers = self._watchers, []
        for w in watchers:
            w.put(None)

    def _unsubscribe(self, watcher: Watcher) -> None:
        with self._lock:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    def _emit(self, event: Event) -> None:
        # caller holds the lock: events reach every watcher in table order
        for w in self._watchers:
            if w.wants(event):
                w.put(event)


def _validate(role: str, address: str, model_id: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not address:
        raise ValueError("address is required (the worker's gRPC host:port)")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address must be host:port with a port in 1..65535, got {address!r}")
    if not model_id:
        raise ValueError("model_id is required (the served model's id)")
