"""Worker-side load shedding: refuse a new request while too many already wait here.

A worker whose queue is long answers RESOURCE_EXHAUSTED at once instead of queueing one
more request behind the others; the gateway then retries the request on another worker
(services/gateway/breaker.py: RETRYABLE, never held against the worker's circuit) and,
out of workers, answers 429 with Retry-After. Off by default (`--shed-queued 0`): no
fixed queue caps a worker below its engine's own limits unless the operator asks.

"Waiting" counts requests not yet running on this worker: queued in the engine for a
batch slot or pages (EngineStats.waiting, published after every engine-loop turn, so it
may lag one forward step), rooms of this worker's protocol still being made or deferred,
and decode holds waiting for pages (EngineStats.prealloc_queue).
"""
from __future__ import annotations

from typing import Callable

from pdmesh.disagg.ports import Code, RoomError


def check_load(limit: int, waiting: Callable[[], int], worker: str) -> None:
    """Raise RoomError(RESOURCE_EXHAUSTED) when `limit` > 0 and `waiting()` (counted
    only then) requests already wait."""
    if limit <= 0:
        return
    n = waiting()
    if n >= limit:
        raise RoomError(Code.RESOURCE_EXHAUSTED,
                        f"{worker} worker is shedding load: {n} requests already wait "
                        f"here (--shed-queued {limit}); retry on another worker or later")
