"""Routing replay, no workers: where each prefill policy sends multi-turn conversations
that share a system prompt, and how many prompt tokens each prefill must then compute.

N conversations x T turns over P prefills, the H200 multi-turn run's shapes (1,083-token
system prompt, 64-token user turns, 32-token replies). Each turn's N prompts are routed
while the earlier ones are in flight (in-flight requests and charged prompt tokens count
for the policies, as in the WorkerPool); everything settles at the turn's end. A prefill
computes a prompt's tokens after the longest prefix (whole 16-token pages) of a prompt it
was sent before: an ideal prefix cache, no eviction.

    .venv/bin/python benchmarks/routing_replay.py [--conversations 64 --turns 8 --prefills 2]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdmesh.services.gateway.routing import Worker, make_policy  # noqa: E402


def common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def replay(name: str, conversations: int, turns: int, prefills: int) -> tuple[list, list]:
    """(requests per prefill, prompt tokens computed per prefill) under policy `name`."""
    ws = [Worker(f"p{i}", "PREFILL", f"p{i}:1", "m") for i in range(prefills)]
    policy, rng = make_policy(name), random.Random(0)
    history = {c: list(range(1083)) for c in range(conversations)}
    sent: dict[str, list[list[int]]] = {w.worker_id: [] for w in ws}
    requests, work = [0] * prefills, [0] * prefills
    for _ in range(turns):
        for c in range(conversations):
            history[c] += [rng.randrange(50_000) for _ in range(64)]
        for c in rng.sample(range(conversations), conversations):
            p = history[c]
            w = policy(ws, tokens=p) if getattr(policy, "wants_tokens", False) else policy(ws)
            i = ws.index(w)
            cached = max((common(q, p) for q in sent[w.worker_id]), default=0) // 16 * 16
            w.pending_prefill_tokens += len(p) - cached
            w.inflight += 1
            requests[i], work[i] = requests[i] + 1, work[i] + len(p) - cached
            sent[w.worker_id].append(list(p))
        for w in ws:
            w.pending_prefill_tokens = w.inflight = 0
        for c in range(conversations):
            history[c] += [rng.randrange(50_000) for _ in range(32)]  # the reply
    return requests, work


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--prefills", type=int, default=2)
    a = ap.parse_args()
    print("| policy | requests per prefill | prompt tokens computed per prefill | busiest |")
    print("|---|---|---|---|")
    for name in ("round_robin", "cache_aware", "cache_cost"):
        req, work = replay(name, a.conversations, a.turns, a.prefills)
        print(f"| {name} | {req} | {work} | {max(work):,} |")


if __name__ == "__main__":
    main()
