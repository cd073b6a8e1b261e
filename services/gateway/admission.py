"""Admission at the gateway: a limit on requests in flight and a bounded FIFO wait queue.

    acquire(): a free slot -> run at once; else a queue place -> wait (FIFO) for a slot,
               at most queue_timeout_s; else (queue full, or waited too long) Rejected.
    release(): the slot goes straight to the oldest waiter, or back to the pool.

A Rejected request becomes HTTP 429 / gRPC RESOURCE_EXHAUSTED with a retry hint
(services/gateway/dispatch.py). The hint is jittered so that clients turned away together
(a burst) do not all come back in the same instant. The limiter is per process: with
`--processes N` the gateway as a whole admits up to N times the limits.

Plain asyncio, one event loop, no locks: every method runs on the loop thread.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import time
from typing import AsyncIterator

log = logging.getLogger(__name__)

QUEUE_FULL, QUEUE_TIMEOUT = "queue_full", "queue_timeout"
# rejecting "stops" (one log line) once no request was rejected for this long
_QUIET_S = 1.0


class Rejected(Exception):
    """No slot and no queue place (`reason` QUEUE_FULL), or the wait ran out (QUEUE_TIMEOUT)."""

    def __init__(self, reason: str, retry_after_s: float, message: str) -> None:
        super().__init__(message)
        self.reason, self.retry_after_s, self.message = reason, retry_after_s, message

    def retry_headers(self) -> tuple[tuple[str, str], ...]:
        """`retry-after` in whole seconds (the HTTP standard's form) and `retry-after-ms`
        with the jitter (what OpenAI's clients read first)."""
        return (("retry-after", str(max(1, math.ceil(self.retry_after_s)))),
                ("retry-after-ms", str(max(1, round(self.retry_after_s * 1000)))))


class Admission:
    """Requests in flight <= max_inflight (0 = no limit), at most max_queued waiting.

    `metrics`: a GatewayMetrics (its admission gauges and rejection counter), or None.
    """

    def __init__(self, max_inflight: int = 0, max_queued: int = 0,
                 queue_timeout_s: float = 0.0, retry_after_s: float = 1.0,
                 metrics=None) -> None:
        if max_inflight < 0 or max_queued < 0 or queue_timeout_s < 0 or retry_after_s <= 0:
            raise ValueError("admission limits must be >= 0 and retry_after_s > 0")
        self.max_inflight, self.max_queued = max_inflight, max_queued
        self.queue_timeout_s, self.retry_after_s = queue_timeout_s, retry_after_s
        self.metrics = metrics
        self.inflight = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self.rejected = 0  # in the current episode of rejecting (for the log line)
        self._last_reject = 0.0
        self._quiet_check: asyncio.TimerHandle | None = None

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """`async with admission.slot():` holds one slot for the body (Rejected if none)."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if need be; raises Rejected."""
        if not self.max_inflight or (self.inflight < self.max_inflight and not self._waiters):
            self._take()
            return
        if len(self._waiters) >= self.max_queued:
            raise self._reject(QUEUE_FULL, f"The gateway is at its limit of "
                               f"{self.max_inflight} requests in flight and {self.max_queued} "
                               "queued; retry later.")
        await self._wait()

    def release(self) -> None:
        """Give the slot back: to the oldest waiter if there is one (it keeps the count)."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot changes hands: inflight is unchanged
                self._gauges()
                return
        self.inflight -= 1
        self._gauges()

    def _take(self) -> None:
        self.inflight += 1
        self._gauges()

    async def _wait(self) -> None:
        """Queue in FIFO order until release() hands us a slot. Leaving the queue early
        (timeout, or the caller cancelled: its client went away) frees the place; a slot
        handed over at that very moment is kept (timeout) or passed on (cancelled)."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._gauges()
        try:
            async with asyncio.timeout(self.queue_timeout_s or None):
                await fut
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                return  # the slot came as the timer fired: use it
            raise self._reject(QUEUE_TIMEOUT, f"The request waited {self.queue_timeout_s:g} s "
                               "in the gateway's queue without a free slot; retry later.") from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a slot we will not use
            raise
        finally:
            self._discard(fut)

    def _discard(self, fut: asyncio.Future) -> None:
        """Drop `fut` from the queue if it is still there (it left before its turn)."""
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)
            self._gauges()

    def _reject(self, reason: str, message: str) -> Rejected:
        """Count and (once per episode) log a rejection; the hint has ±50% jitter."""
        self.rejected += 1
        self._last_reject = time.monotonic()
        if self.metrics is not None:
            self.metrics.admission_rejected.labels(reason).inc()
        if self._quiet_check is None:
            log.warning("gateway admission: rejecting requests (%s; %d in flight, limit %d; "
                        "%d queued, limit %d)", reason, self.inflight, self.max_inflight,
                        len(self._waiters), self.max_queued)
            self._schedule_quiet_check(_QUIET_S)
        return Rejected(reason, self.retry_after_s * random.uniform(0.5, 1.5), message)

    def _schedule_quiet_check(self, delay: float) -> None:
        self._quiet_check = asyncio.get_running_loop().call_later(delay, self._quiet)

    def _quiet(self) -> None:
        """Log the end of an episode once no request was rejected for _QUIET_S."""
        left = self._last_reject + _QUIET_S - time.monotonic()
        if left > 0:
            self._schedule_quiet_check(left)
            return
        log.warning("gateway admission: stopped rejecting (%d rejected; %d in flight, "
                    "%d queued)", self.rejected, self.inflight, len(self._waiters))
        self._quiet_check, self.rejected = None, 0

    def close(self) -> None:
        """Cancel the pending end-of-episode check (the loop is going away)."""
        if self._quiet_check is not None:
            self._quiet_check.cancel()
            self._quiet_check = None

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.admission_inflight.set(self.inflight)
            self.metrics.admission_queued.set(len(self._waiters))
