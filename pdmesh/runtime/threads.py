"""torch intra-op threads per engine step on CPU: one count for prefill steps, one for the
others (decode); and the stepping thread's nice value.

Why two: on a small host a prefill step is a few large GEMMs that scale with threads,
and while it runs nothing streams (prefill goes first), so the gateway and the worker's
RPC thread idle; a decode step is hundreds of small ops, where a second thread gains
little and, on a shared host, an OpenMP barrier waiting for a descheduled thread costs a
lot (benchmarks/results/2026-11-30-cpu-vs-vllm-threads.md). `pdmesh serve` picks both
counts per worker (commands/placement.py).

Why a nice value: a decode worker beside a prefill worker on the same cores takes the core
a prefill step's second thread needs, and every step waits for its slowest thread; at nice
19 (a decode worker's, set by `pdmesh serve`) the decode steps get what the prefill leaves
(CFS weight 15 vs 1,024), so prompts go first across processes as prefill goes first
inside one engine. Nice, not SCHED_IDLE: never starved outright
(benchmarks/results/2026-11-30-cpu-spin-idle.md).

Both are set in the thread that steps the engine, before its first step: OpenMP's (and
MKL's) thread count is per calling thread, and on Linux a nice value is per thread and
inherited by the threads it starts (the OpenMP pool of its parallel regions), so neither
would reach a worker's engine thread if set where the Engine was built. The worker's RPC
threads keep their priority: tokens stream at once.
"""
from __future__ import annotations

import os
import threading

import torch


class StepThreads:
    """`enter(kind)` before a step of `kind` ("prefill" | "decode") sets torch's intra-op
    thread count for it, and with `nice` the calling thread's nice value once; a no-op
    off CPU or when nothing is configured."""

    def __init__(self, device: str, num_threads: int | None,
                 prefill_threads: int | None, nice: int = 0) -> None:
        on = device == "cpu" and bool(num_threads or prefill_threads)
        self.decode = (num_threads or torch.get_num_threads()) if on else None
        self.prefill = (prefill_threads or self.decode) if on else None
        self.nice = nice if device == "cpu" else 0
        self._niced: int | None = None  # native id of the thread last given `nice`

    def enter(self, kind: str) -> None:
        if self.nice and self._niced != threading.get_native_id():
            self._niced = nice_this_thread(self.nice)
        if self.decode is None:
            return
        want = self.prefill if kind == "prefill" else self.decode
        if torch.get_num_threads() != want:  # omp_get_max_threads of this thread: cheap
            torch.set_num_threads(want)


def nice_this_thread(nice: int) -> int:
    """Give the calling thread (not its process) nice value `nice` (Linux: a thread id is
    a PRIO_PROCESS target; raising it needs no privilege); returns the thread's id."""
    tid = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, tid, nice)
    return tid
