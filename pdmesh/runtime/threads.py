"""torch intra-op threads per engine step on CPU: one count for prefill steps, one for the
others (decode); and the stepping thread's CPU priority.

Why two counts: on a small host a prefill step is a few large GEMMs that scale with
threads, and while it runs nothing streams (prefill goes first), so the gateway and the
worker's RPC thread idle; a decode step is hundreds of small ops, where a second thread
gains little (benchmarks/results/2026-11-30-cpu-vs-vllm-threads.md). `pdmesh serve` picks
both counts per worker (commands/placement.py).

Why a priority: a decode worker beside a prefill worker on the same cores takes the core
a prefill step's second thread needs, and every step waits for its slowest thread; a
stepping thread at SCHED_IDLE (a decode worker's, set by `pdmesh serve`) runs only on
cores nothing else wants, so prompts go first across processes as prefill goes first
inside one engine. A nice value of 10 was not enough: the decode still took ~75% of a
core during a burst of prompts (benchmarks/results/2026-11-30-cpu-spin-idle.md). A worker
runs such an engine in its own process, all of it idle (`idle_process`): an idle thread
preempted while holding the GIL stalls every thread waiting for it.

Both are set in the thread that steps the engine: OpenMP's (and MKL's) thread count is
per calling thread, and on Linux a scheduling policy is per thread and inherited by the
threads it starts (the OpenMP pool its parallel regions use), so neither would reach a
worker's engine thread if set where the Engine was built.
"""
from __future__ import annotations

import os
import threading

import torch


class StepThreads:
    """`enter(kind)` before a step of `kind` ("prefill" | "decode") sets torch's intra-op
    thread count for it, and with `idle` the calling thread's policy once; a no-op off CPU
    or when nothing is configured."""

    def __init__(self, device: str, num_threads: int | None,
                 prefill_threads: int | None, idle: bool = False) -> None:
        on = device == "cpu" and bool(num_threads or prefill_threads)
        self.decode = (num_threads or torch.get_num_threads()) if on else None
        self.prefill = (prefill_threads or self.decode) if on else None
        self.idle = idle and device == "cpu"
        self._idled: int | None = None  # native id of the thread last set to SCHED_IDLE

    def enter(self, kind: str) -> None:
        if self.idle and self._idled != threading.get_native_id():
            self._idled = idle_this_thread()
        if self.decode is None:
            return
        want = self.prefill if kind == "prefill" else self.decode
        if torch.get_num_threads() != want:  # omp_get_max_threads of this thread: cheap
            torch.set_num_threads(want)


def idle_this_thread() -> int:
    """Put the calling thread (not its process) under SCHED_IDLE where the OS has it
    (Linux; needs no privilege); returns the thread's native id."""
    tid = threading.get_native_id()
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    return tid


def idle_process() -> None:
    """Every thread of this process under SCHED_IDLE (Linux; the threads it starts later
    inherit it). An engine core process whose engine steps at SCHED_IDLE takes it whole:
    its other threads (KV, commands) share the engine thread's GIL, and a normal thread
    waiting for the GIL held by a preempted idle one would wait as long as it."""
    if not hasattr(os, "SCHED_IDLE"):
        return
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
        except ProcessLookupError:  # the thread ended meanwhile
            pass
