"""torch intra-op threads per engine step on CPU: one count for prefill steps, one for the
others (decode).

Why two: on a small host a prefill step is a few large GEMMs that scale with threads,
and while it runs nothing streams (prefill goes first), so the gateway and the worker's
RPC thread idle; a decode step is hundreds of small ops, where a second thread gains
little and, on a shared host, an OpenMP barrier waiting for a descheduled thread costs a
lot (benchmarks/results/2026-11-30-cpu-vs-vllm-threads.md). `pdmesh serve` picks both
counts per worker (commands/serve.py).

The count is set in the thread that steps the engine, before each step whose kind wants
another count than the thread has: OpenMP's (and MKL's) thread count is per calling
thread, so a count set where the Engine was built would not reach a worker's engine
thread.
"""
from __future__ import annotations

import torch


class StepThreads:
    """`enter(kind)` before a step of `kind` ("prefill" | "decode") sets torch's intra-op
    thread count for it; a no-op off CPU or when neither count is configured."""

    def __init__(self, device: str, num_threads: int | None,
                 prefill_threads: int | None) -> None:
        on = device == "cpu" and bool(num_threads or prefill_threads)
        self.decode = (num_threads or torch.get_num_threads()) if on else None
        self.prefill = (prefill_threads or self.decode) if on else None

    def enter(self, kind: str) -> None:
        if self.decode is None:
            return
        want = self.prefill if kind == "prefill" else self.decode
        if torch.get_num_threads() != want:  # omp_get_max_threads of this thread: cheap
            torch.set_num_threads(want)
