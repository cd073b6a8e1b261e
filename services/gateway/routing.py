"""Routing policies: pick one worker out of candidates. Plain Python, no grpc.

A policy is a callable object `pick(candidates) -> Worker` built by name from
`POLICIES` (the plug-in point: `register_policy("name", factory)`). Prefill and
decode each get their own policy instance, so round_robin keeps one cursor per role.
Load-aware policies read `Worker.load` (the registry's last LoadReport).

Optional parts of the interface, each looked up with getattr so that plain policies
need none of them:
  - `wants_tokens = True`: the pool calls `pick(candidates, tokens=prompt_ids)`
    (cache_aware, cache_cost, prefix_hash; tokens may be None, e.g. a has_route() probe);
  - `from_config(GatewayConfig)` on the factory: make_policy builds it from the config;
  - `forget(worker_id)`: the worker left the pool (drop what the policy kept of it);
  - `last_detail`: a dict describing the last pick (route span attributes).
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import random
import threading
from array import array
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from pdmesh.config import GatewayConfig, ROUTING_POLICIES, check_routing_policy
from pdmesh.services.gateway.cache_cost import CacheCostPolicy
from pdmesh.services.gateway.prefix_tree import PrefixTree, split


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
    # prompt tokens this gateway sent it to compute (the routing policy's estimate of the
    # uncached part, else the whole prompt) whose prefill has not come back: the pool
    # charges a route and settles it at its first token or its end (cache_cost reads it)
    pending_prefill_tokens: int = 0
    # KV bytes of one token in its pool (registry layout; 0: unknown), for pd_mode.py
    kv_bytes_per_token: float = 0.0
    # what it reuses of earlier requests' KV (registry KvReuse; unset: an older worker,
    # whose defaults were both on), for pd_mode.py: its prefix cache for the prompts it
    # prefills itself, and adopted KV (decode-side reuse: a remote prefill sends only
    # the pages after the prefix it has)
    prefix_cache: bool = True
    reuses_adopted_kv: bool = True


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


class CacheAwarePolicy:
    """SGLang Model Gateway's cache_aware: an approximate radix tree per worker of the
    prompts routed there (services/gateway/prefix_tree.py), fed by these picks alone.

    Imbalanced (max load - min load > balance_abs_threshold and max > min *
    balance_rel_threshold, load = requests running + queued, or in flight from here):
    the least loaded worker. Otherwise the worker whose tree holds the longest prefix of
    the prompt if that covers more than cache_threshold of it, else the worker with the
    smallest tree (the most cache to spare). The prompt then goes into the chosen
    worker's tree. Not thread-safe: the WorkerPool calls it under its lock."""

    wants_tokens = True

    def __init__(self, cache_threshold: float = 0.3, balance_abs_threshold: int = 64,
                 balance_rel_threshold: float = 1.5, max_tree_size: int = 1 << 26,
                 chunk_tokens: int = 16) -> None:
        self.cache_threshold = cache_threshold
        self.balance_abs, self.balance_rel = balance_abs_threshold, balance_rel_threshold
        self.max_tree_size, self.chunk_tokens = max_tree_size, chunk_tokens
        self.trees: dict[str, PrefixTree] = {}  # worker id -> its tree
        self.last_detail: dict[str, object] = {}

    @classmethod
    def from_config(cls, config: GatewayConfig) -> CacheAwarePolicy:
        """Built from GatewayConfig's cache_threshold, balance_*_threshold, max_tree_size."""
        return cls(config.cache_threshold, config.balance_abs_threshold,
                   config.balance_rel_threshold, config.max_tree_size)

    def __call__(self, candidates: Sequence[Worker],
                 tokens: Sequence[int] | None = None) -> Worker:
        chunks = split(tokens or (), self.chunk_tokens)
        n = max(len(tokens or ()), 1)
        matched = {w.worker_id: self._tree(w).match(chunks) for w in candidates}
        best = min(candidates, key=lambda w: (-matched[w.worker_id], _load(w), w.worker_id))
        rate = matched[best.worker_id] / n
        if self._imbalanced(candidates):
            pick, how = min(candidates, key=lambda w: (load_score(w), w.worker_id)), "balance"
        elif rate > self.cache_threshold:
            pick, how = best, "cache"
        else:
            pick = min(candidates, key=lambda w: (self._tree(w).size, _load(w), w.worker_id))
            how = "smallest_tree"
        self.last_detail = {"match_rate": round(rate, 4), "balance_override": how == "balance",
                            "choice": how}
        if chunks:
            self._tree(pick).insert(chunks)
        return pick

    def _imbalanced(self, candidates: Sequence[Worker]) -> bool:
        loads = [_load(w) for w in candidates]
        lo, hi = min(loads), max(loads)
        return hi - lo > self.balance_abs and hi > lo * self.balance_rel

    def forget(self, worker_id: str) -> None:
        """The worker left the pool: drop its tree."""
        self.trees.pop(worker_id, None)

    def _tree(self, w: Worker) -> PrefixTree:
        tree = self.trees.get(w.worker_id)
        if tree is None:
            tree = self.trees[w.worker_id] = PrefixTree(self.max_tree_size, self.chunk_tokens)
        return tree


class PrefixHashPolicy:
    """SGLang Model Gateway's prefix_hash: the first prefix_token_count token ids, hashed
    onto a consistent-hash ring of the candidates (virtual_nodes points each). A repeated
    prefix lands on the same worker while the candidates are the same; a worker joining
    or leaving moves only the keys of its own arcs (~1/n of them)."""

    wants_tokens = True

    def __init__(self, prefix_token_count: int = 256, virtual_nodes: int = 160) -> None:
        self.prefix_token_count, self.virtual_nodes = prefix_token_count, virtual_nodes
        self._rings: dict[tuple[str, ...], tuple[list[int], list[str]]] = {}
        self.last_detail: dict[str, object] = {}

    @classmethod
    def from_config(cls, config: GatewayConfig) -> PrefixHashPolicy:
        """Built from GatewayConfig's prefix_token_count."""
        return cls(config.prefix_token_count)

    def __call__(self, candidates: Sequence[Worker],
                 tokens: Sequence[int] | None = None) -> Worker:
        points, owners = self._ring(candidates)
        key = _hash64(array("q", (tokens or ())[:self.prefix_token_count]).tobytes())
        owner = owners[bisect.bisect_left(points, key) % len(points)]
        self.last_detail = {"prefix_hash": f"{key:016x}"}
        return next(w for w in candidates if w.worker_id == owner)

    def _ring(self, candidates: Sequence[Worker]) -> tuple[list[int], list[str]]:
        """(sorted points, their worker ids) for this candidate set, cached."""
        ids = tuple(sorted(w.worker_id for w in candidates))
        ring = self._rings.get(ids)
        if ring is None:
            if len(self._rings) >= 16:  # membership changed often: start over
                self._rings.clear()
            pts = sorted((_hash64(f"{wid}#{i}".encode()), wid)
                         for wid in ids for i in range(self.virtual_nodes))
            ring = self._rings[ids] = ([p for p, _ in pts], [wid for _, wid in pts])
        return ring


def _load(w: Worker) -> int:
    """Requests on a worker: reported running + queued, or ours in flight if more."""
    return load_score(w)[0]


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


# the names are pdmesh.config.ROUTING_POLICIES (GatewayConfig validates against them)
POLICIES: dict[str, Callable[[], Policy]] = {
    "random": RandomPolicy,
    "round_robin": RoundRobinPolicy,
    "power_of_two": PowerOfTwoPolicy,
    "least_load": LeastLoadPolicy,
    "cache_aware": CacheAwarePolicy,
    "cache_cost": CacheCostPolicy,
    "prefix_hash": PrefixHashPolicy,
}


def register_policy(name: str, factory: Callable[[], Policy]) -> None:
    """Add a policy under `name` (usable by --prefill-policy / --decode-policy)."""
    POLICIES[name] = factory
    ROUTING_POLICIES.add(name)


def make_policy(name: str, config: GatewayConfig | None = None) -> Policy:
    """A fresh policy instance (factories with `from_config` get `config`, by default
    GatewayConfig()); ValueError listing the known names otherwise."""
    check_routing_policy(name)
    factory = POLICIES[name]
    if hasattr(factory, "from_config"):
        return factory.from_config(config or GatewayConfig())
    return factory()
