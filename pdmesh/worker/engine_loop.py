"""Runs an Engine on its own thread, apart from any RPC event loop (DESIGN.md, "Notes").

Servicers never touch the Engine: they submit commands (`add`, `hold`, `adopt`,
`abort`, `release`, or any `call(fn)`) that run on the loop thread between steps, and get
each request's progress through the callback they registered. Callbacks run on the loop
thread and must only hand the output over (e.g. `loop.call_soon_threadsafe(...)`).

Decode's pre-allocation queue lives here too: a `hold` that doesn't fit waits, in FIFO
order, and is retried after every step until pages free up or it is cancelled.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from pdmesh.runtime.engine import Engine, RequestOutput
from pdmesh.runtime.request import Request

OnOutput = Callable[[RequestOutput], None]
OnHeld = Callable[[list[int]], None]


class EngineLoop:
    """One engine, one thread. Thread-safe: every public method may be called from anywhere."""

    def __init__(self, engine: Engine, idle_wait: float = 0.05) -> None:
        self.engine = engine
        self.forward_sleep_time = 0.0  # SlowDown: seconds to sleep after each step
        self._idle_wait = idle_wait
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._callbacks: dict[str, OnOutput] = {}
        self._prealloc: collections.OrderedDict[str, tuple[Request, OnHeld]] = (
            collections.OrderedDict())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.steps = 0
        # cumulative, written on the loop thread only (metrics read them racily: ints)
        self.prompt_tokens = 0  # prompt tokens computed (counted when a prefill completes)
        self.generation_tokens = 0  # tokens sampled by this engine's steps (not adopted)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current step; queued commands that never ran get an error."""
        self._stop.set()
        self._commands.put((lambda: None, Future()))  # wake the thread
        self._thread.join(timeout)

    # -- commands ------------------------------------------------------------------------
    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn()` on the loop thread between steps; its result or exception in a Future."""
        fut: Future = Future()
        if self._stop.is_set():
            fut.set_exception(RuntimeError("engine loop is stopped"))
        else:
            self._commands.put((fn, fut))
        return fut

    def add(self, req: Request, on_output: OnOutput) -> Future:
        """Queue a GENERATE or PREFILL_ONLY request (from engine.make_request)."""
        def run() -> None:
            self._callbacks[req.request_id] = on_output
            self.engine.requests[req.request_id] = req
            self.engine.scheduler.add(req)
        return self.call(run)

    def hold(self, req: Request, on_held: OnHeld) -> Future:
        """Pre-allocate pages for an ADOPTED request; `on_held(pages)` once they are taken
        (at once, or later from the pre-allocation queue)."""
        def run() -> None:
            self._prealloc[req.request_id] = (req, on_held)
            self._drain_prealloc()
        return self.call(run)

    def adopt(self, request_id: str, first_token: int, first_logprob: Any,
              on_output: OnOutput) -> Future:
        """Start decoding a held request; outputs (the first token's included) go to on_output."""
        def run() -> None:
            self._callbacks[request_id] = on_output
            self._deliver(self.engine.adopt(request_id, first_token, first_logprob))
        return self.call(run)

    def abort(self, request_id: str) -> Future:
        """Abort wherever the request is (queued for pages, waiting, running, held)."""
        def run() -> bool:
            self._callbacks.pop(request_id, None)
            queued = self._prealloc.pop(request_id, None) is not None
            return self.engine.abort(request_id) or queued
        return self.call(run)

    def release(self, request_id: str) -> Future:
        """Free a finished PREFILL_ONLY request's pages (its KV has been sent)."""
        def run() -> None:
            self._callbacks.pop(request_id, None)
            self.engine.release(request_id)
        return self.call(run)

    @property
    def prealloc_len(self) -> int:
        """Requests waiting in the pre-allocation queue (read it on the loop thread)."""
        return len(self._prealloc)

    def stats(self) -> Future:
        """Engine counters plus the pre-allocation queue length, read on the loop thread."""
        return self.call(lambda: {**self.engine.stats(), "prealloc_queue": self.prealloc_len})

    # -- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._run_commands(block=not self.engine.has_unfinished())
            self._drain_prealloc()  # an abort or release may have freed pages
            if self.engine.has_unfinished():
                for out in self.engine.step():
                    self._account(out)
                    self._deliver(out)
                self.steps += 1
                if self.forward_sleep_time > 0:
                    time.sleep(self.forward_sleep_time)
        self._fail_pending()

    def _run_commands(self, block: bool) -> None:
        try:
            fn, fut = self._commands.get(timeout=self._idle_wait) if block else \
                self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # the caller gets it through the Future
                    fut.set_exception(e)
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return

    def _account(self, out: RequestOutput) -> None:
        if len(out.token_ids) == 1:  # sampled right after the prompt's last chunk
            self.prompt_tokens += len(out.prompt_token_ids)
        if not out.pages:  # a PREFILL_ONLY output's token is the decode worker's to count
            self.generation_tokens += len(out.new_token_ids)

    def _deliver(self, out: RequestOutput) -> None:
        # a finished output is the request's last (PREFILL_ONLY: token 1, pages held)
        cb = self._callbacks.pop(out.request_id, None) if out.finished else \
            self._callbacks.get(out.request_id)
        if cb is not None:
            cb(out)

    def _drain_prealloc(self) -> None:
        """Admit held requests in FIFO order while they fit."""
        while self._prealloc:
            rid, (req, on_held) = next(iter(self._prealloc.items()))
            pages = self.engine.hold(req)
            if pages is None:
                return
            del self._prealloc[rid]
            on_held(pages)

    def _fail_pending(self) -> None:
        while True:
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError("engine loop stopped"))
