"""Per-worker circuit breakers and the gateway's retry policy. Plain Python, no grpc calls.

A breaker follows one worker's consecutive outcomes as the gateway sees them:

    closed --(failure_threshold consecutive failures)--> open
    open   --(open_s elapsed; checked lazily when routing)--> half-open
    half-open: one probe request at a time; success_threshold successes -> closed,
               any failure -> open again (a fresh cool-down)

Defaults follow SGLang Model Gateway (SMG): --cb-failure-threshold 5,
--cb-success-threshold 2, --cb-timeout-duration-secs 30.

`Breakers` keeps one breaker per worker id for the WorkerPool (which asks it which
candidates may be routed to) and the Dispatcher (which reports outcomes); it publishes
`pdmesh_gateway_circuit_state{worker,role}` and logs one line per state change.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)
CLOSED, OPEN, HALF_OPEN = 0, 1, 2  # the values of pdmesh_gateway_circuit_state
STATE_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half-open"}

# Failures another pair may not have: the worker is gone or broke (UNAVAILABLE, UNKNOWN,
# INTERNAL), the KV never came (DEADLINE_EXCEEDED) or came corrupted (DATA_LOSS: the KV
# checksum), the room was dropped (CANCELLED, ABORTED), the worker is full
# (RESOURCE_EXHAUSTED), the room id clashed (ALREADY_EXISTS: the retry has a new one). Everything else (INVALID_ARGUMENT above all) is the request's
# own fault or a deployment error, the same on every worker: never retried, never held
# against the worker.
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.DATA_LOSS})


@dataclass(frozen=True)
class BreakerConfig:
    """When a worker's circuit opens, how long it stays open, what closes it."""

    failure_threshold: int = 5  # consecutive failures that open it (SMG default)
    success_threshold: int = 2  # half-open successes that close it (SMG default)
    open_s: float = 30.0  # cool-down before the half-open probe (SMG default)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded attempts with exponential backoff and full jitter (AWS architecture blog,
    "Exponential Backoff And Jitter"): spread retries of a burst that failed together."""

    max_attempts: int = 3  # attempts in all, the first included
    base_s: float = 0.02
    cap_s: float = 0.5

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to sleep before retry number `retry` (1 = the first retry)."""
        return (rng or random).uniform(0.0, min(self.cap_s, self.base_s * 2 ** (retry - 1)))

    @staticmethod
    def retryable(code: grpc.StatusCode) -> bool:
        return code in RETRYABLE


class CircuitBreaker:
    """One worker's breaker; not thread-safe by itself (Breakers holds the lock)."""

    def __init__(self, config: BreakerConfig, clock: Callable[[], float] = time.monotonic):
        self.config, self.clock = config, clock
        self.state = CLOSED
        self.failures = self.successes = 0  # consecutive, in the current state
        self.opened_at = 0.0  # clock() when it last opened
        self.probing = False  # half-open: the one probe request is in flight

    def available(self) -> bool:
        """May a request be routed here now? (open -> half-open once the cool-down ran)"""
        if self.state == OPEN and self.clock() - self.opened_at >= self.config.open_s:
            self._to(HALF_OPEN)
        if self.state == HALF_OPEN:
            return not self.probing
        return self.state == CLOSED

    def taken(self) -> None:
        """A request was routed here: in half-open it is the probe."""
        if self.state == HALF_OPEN:
            self.probing = True

    def done(self) -> None:
        """The request ended without a verdict (client gone): free the probe slot."""
        self.probing = False

    def success(self) -> None:
        self.failures, self.probing = 0, False
        if self.state != CLOSED:
            self.successes += 1
            if self.successes >= self.config.success_threshold:
                self._to(CLOSED)

    def failure(self) -> None:
        self.successes, self.probing = 0, False
        self.failures += 1
        if self.state == HALF_OPEN or (
                self.state == CLOSED and self.failures >= self.config.failure_threshold):
            self._to(OPEN)

    def _to(self, state: int) -> None:
        if state == OPEN:
            self.opened_at = self.clock()
        self.state, self.successes = state, 0
        if state == CLOSED:
            self.failures = 0


class ResilienceMetrics:
    """The breakers' and retries' Prometheus series, on the gateway's registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.circuit_state = Gauge(
            "pdmesh_gateway_circuit_state", "Per-worker circuit breaker: 0 closed, 1 open, "
            "2 half-open", ["worker", "role"], registry=r, multiprocess_mode="max")
        self.retries = Counter(
            "pdmesh_gateway_retries", "Requests retried on another pair before their first "
            "token, by the failed leg and gRPC code (e.g. prefill_UNAVAILABLE)", ["reason"],
            registry=r)


class Breakers:
    """Thread-safe breakers by worker id, created on first sight, dropped when it leaves."""

    def __init__(self, config: BreakerConfig | None = None,
                 metrics: ResilienceMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self.metrics, self.clock = config or BreakerConfig(), metrics, clock
        self._by_id: dict[str, tuple[CircuitBreaker, str]] = {}  # id -> (breaker, role)
        self._lock = threading.Lock()

    def _get(self, worker_id: str, role: str) -> CircuitBreaker:
        entry = self._by_id.get(worker_id)
        if entry is None:
            entry = self._by_id[worker_id] = (CircuitBreaker(self.config, self.clock), role)
            self._publish(worker_id, role, CLOSED)
        return entry[0]

    def _publish(self, worker_id: str, role: str, state: int) -> None:
        if self.metrics is not None:
            self.metrics.circuit_state.labels(worker_id, role).set(state)

    def _changed(self, worker_id: str, role: str, before: int, b: CircuitBreaker) -> None:
        """One log line and a gauge update per state change."""
        if b.state == before:
            return
        self._publish(worker_id, role, b.state)
        log.warning("circuit %s -> %s for %s worker %s (%d consecutive failures)",
                    STATE_NAMES[before], STATE_NAMES[b.state], role.lower(), worker_id,
                    b.failures)

    def state(self, worker_id: str) -> int:
        with self._lock:
            entry = self._by_id.get(worker_id)
            return entry[0].state if entry else CLOSED

    def usable(self, candidates: Sequence, exclude: Iterable[str] = ()) -> list:
        """The candidates (routing.Worker) a request may go to: not excluded (unless that
        excludes all) and not open; when every one is open, the least recently opened,
        so a role whose workers all failed still gets tried instead of failing at once."""
        exclude = set(exclude)
        pool = [w for w in candidates if w.worker_id not in exclude] or list(candidates)
        with self._lock:
            ok = []
            for w in pool:
                b = self._get(w.worker_id, w.role)
                before = b.state
                if b.available():
                    ok.append(w)
                self._changed(w.worker_id, w.role, before, b)
            if ok or not pool:
                return ok
            return [min(pool, key=lambda w: self._by_id[w.worker_id][0].opened_at)]

    def _apply(self, worker, what: Callable[[CircuitBreaker], None]) -> None:
        with self._lock:
            b = self._get(worker.worker_id, worker.role)
            before = b.state
            what(b)
            self._changed(worker.worker_id, worker.role, before, b)

    def taken(self, worker) -> None:
        self._apply(worker, CircuitBreaker.taken)

    def done(self, worker) -> None:
        self._apply(worker, CircuitBreaker.done)

    def success(self, worker) -> None:
        self._apply(worker, CircuitBreaker.success)

    def failure(self, worker) -> None:
        self._apply(worker, CircuitBreaker.failure)

    def forget(self, worker_id: str) -> None:
        """The worker left the mesh: drop its breaker and its series."""
        with self._lock:
            entry = self._by_id.pop(worker_id, None)
        if entry is not None and self.metrics is not None:
            try:
                self.metrics.circuit_state.remove(worker_id, entry[1])
            except KeyError:
                pass
