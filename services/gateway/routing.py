"""Routing policies: pick one worker out of candidates. Plain Python, no grpc.

A policy is a callable object `pick(candidates) -> Worker` built by name from
`POLICIES` (the plug-in point: `register_policy("name", factory)`). Prefill and
decode each get their own policy instance, so round_robin keeps one cursor per role.
Load-aware policies read `Worker.load` (the registry's last LoadReport).
"""
from __future__ import annotations

import itertools
import random
import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from pdmesh.config import ROUTING_POLICIES, check_routing_policy


@dataclass
class Load:
    """A worker's last reported load (mirrors registry LoadReport)."""

    running: int = 0
    queued: int = 0
    free_kv_pages: int = 0
    queued_prefill_tokens: int = 0


@dataclass
class Worker:
    """A routable worker as the gateway knows it."""

    worker_id: str
    role: str  # "PREFILL", "DECODE" or "COLOCATED"
    address: str
    model_id: str
    load: Load = field(default_factory=Load)
    # requests this gateway sent and has not seen finish: fresher than heartbeats,
    # so a burst between two heartbeats does not all land on one worker
    inflight: int = 0


def load_score(w: Worker) -> tuple:
    """Lower is less loaded: requests in flight (reported or ours), then queued
    prefill tokens, then fewer free KV pages."""
    return (max(w.load.running + w.load.queued, w.inflight), w.load.queued_prefill_tokens,
            -w.load.free_kv_pages)


class Policy(Protocol):
    def __call__(self, candidates: Sequence[Worker]) -> Worker: ...


class RandomPolicy:
    """Uniformly random."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def __call__(self, candidates: Sequence[Worker]) -> Worker:
        return self.rng.choice(candidates)


class RoundRobinPolicy:
    """Cycles through candidates in worker-id order; stable when members change."""

    def __init__(self) -> None:
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def __call__(self, candidates: Sequence[Worker]) -> Worker:
        with self._lock:
            n = next(self._counter)
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        return ordered[n % len(ordered)]


class PowerOfTwoPolicy:
    """Two random candidates; the one with the lower load wins (ties: the first)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def __call__(self, candidates: Sequence[Worker]) -> Worker:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.sample(list(candidates), 2)
        return b if load_score(b) < load_score(a) else a


class LeastLoadPolicy:
    """The least loaded candidate; ties broken at random so equal workers share."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def __call__(self, candidates: Sequence[Worker]) -> Worker:
        best = min(load_score(w) for w in candidates)
        return self.rng.choice([w for w in candidates if load_score(w) == best])


# the names are pdmesh.config.ROUTING_POLICIES (GatewayConfig validates against them)
POLICIES: dict[str, Callable[[], Policy]] = {
    "random": RandomPolicy,
    "round_robin": RoundRobinPolicy,
    "power_of_two": PowerOfTwoPolicy,
    "least_load": LeastLoadPolicy,
}


def register_policy(name: str, factory: Callable[[], Policy]) -> None:
    """Add a policy under `name` (usable by --prefill-policy / --decode-policy)."""
    POLICIES[name] = factory
    ROUTING_POLICIES.add(name)


def make_policy(name: str) -> Policy:
    """A fresh policy instance; ValueError listing the known names otherwise."""
    check_routing_policy(name)
    return POLICIES[name]()
