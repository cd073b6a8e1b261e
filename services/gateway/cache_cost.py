"""cache_cost: cache-aware routing by estimated prefill work, for the prefill phase.

SGLang Model Gateway's cache_aware (routing.CacheAwarePolicy) sends a prompt to the worker
with the longest cached prefix unless in-flight requests are badly imbalanced (max - min >
64 and max > 1.5 min). When every conversation shares one system prompt, the prefill that
computed it first always has the longest match, and at <= 64 requests in flight the
imbalance rule never fires: every prompt queues on one prefill while the others idle
(H200 2P1D, 64 conversations: mean TTFT of turns >= 2 0.179 s against round robin's 0.093 s,
benchmarks/results/2026-11-30-multi-turn-h200-decode-reuse.md).

This policy instead picks the worker that would finish the prompt soonest, in tokens:

    work(w) = uncached(w) + queued(w)
    uncached(w) = prompt tokens - the prefix w's approximate tree holds (whole chunks)
    queued(w)   = max(prompt tokens this gateway sent w whose prefill has not come back,
                      w's last reported queued_prefill_tokens)

so a prefix match wins only when it saves more than the queue ahead of it costs. A shared
system prompt then spreads over the prefills, each computing it once, while a long
conversation history sticks to the worker that holds it unless that worker's queue
outweighs recomputing it. Ties go to the longer match, then fewer requests, then the
worker id. The trees are the same as cache_aware's (prefix_tree.py: fed by this policy's
own picks, bounded, LRU-evicted); the queued tokens are `Worker.pending_prefill_tokens`,
which the WorkerPool charges with each route's `uncached_tokens` (this policy's
last_detail) and settles at the route's first token or its end.

Plain Python, not thread-safe: the WorkerPool calls it under its lock. Workers are duck
typed (routing.Worker: worker_id, load, inflight, pending_prefill_tokens) so that
routing.py can import this module.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from pdmesh.services.gateway.prefix_tree import PrefixTree, split

if TYPE_CHECKING:
    from pdmesh.services.gateway.routing import Worker


def queued_tokens(w: Worker) -> int:
    """Prompt tokens ahead of a new prompt on `w`: this gateway's unsettled charges or the
    worker's last report (which also counts other gateways' requests), whichever is more."""
    return max(w.pending_prefill_tokens, w.load.queued_prefill_tokens)


def _requests(w: Worker) -> int:
    return max(w.load.running + w.load.queued, w.inflight)


class CacheCostPolicy:
    """Least estimated prefill work: uncached prompt tokens + tokens queued (module doc)."""

    wants_tokens = True

    def __init__(self, max_tree_size: int = 1 << 26, chunk_tokens: int = 16) -> None:
        self.max_tree_size, self.chunk_tokens = max_tree_size, chunk_tokens
        self.trees: dict[str, PrefixTree] = {}  # worker id -> its tree
        self.last_detail: dict[str, object] = {}

    @classmethod
    def from_config(cls, config: Any) -> CacheCostPolicy:
        """Built from GatewayConfig's max_tree_size (the thresholds are cache_aware's)."""
        return cls(config.max_tree_size)

    def __call__(self, candidates: Sequence[Worker],
                 tokens: Sequence[int] | None = None) -> Worker:
        n = len(tokens or ())
        chunks = split(tokens or (), self.chunk_tokens)
        matched = {w.worker_id: self._tree(w).match(chunks) for w in candidates}

        def key(w: Worker) -> tuple:
            m = matched[w.worker_id]
            return (n - m + queued_tokens(w), -m, _requests(w), w.worker_id)

        pick = min(candidates, key=key)
        m = matched[pick.worker_id]
        longest = max(matched.values())
        self.last_detail = {
            "match_rate": round(m / max(n, 1), 4), "uncached_tokens": n - m,
            "queued_tokens": queued_tokens(pick),
            # "cache": the longest match won; "load": a shorter queue beat a longer match
            "choice": "cache" if m == longest and m > 0 else "load" if longest else "no_match"}
        if chunks:
            self._tree(pick).insert(chunks)
        return pick

    def forget(self, worker_id: str) -> None:
        """The worker left the pool: drop its tree."""
        self.trees.pop(worker_id, None)

    def _tree(self, w: Worker) -> PrefixTree:
        tree = self.trees.get(w.worker_id)
        if tree is None:
            tree = self.trees[w.worker_id] = PrefixTree(self.max_tree_size, self.chunk_tokens)
        return tree
