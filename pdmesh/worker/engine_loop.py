"""Runs an Engine on its own thread, apart from any RPC event loop (DESIGN.md, "Notes").

Typed commands in (pdmesh.worker.commands), handled in one place between steps; typed
events out: every `RequestOutput` and `Held` produced in one loop turn is handed to
`on_events` in a single call, so the asyncio side wakes once per step, not once per
token per request. `on_events` runs on the loop thread and must only hand the batch
over (e.g. `loop.call_soon_threadsafe(...)`).

Decode's pre-allocation queue lives here too: a `Hold` that doesn't fit waits, in FIFO
order, and is retried after every step until pages free up or it is aborted.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable

from pdmesh.worker.commands import (Abort, Add, Adopt, Command, EngineStats, FailStep, Held,
                                    Hold, MakeRequest, Release, SlowDown, Start)

if TYPE_CHECKING:  # the RPC process of an --engine-process worker never imports torch
    from pdmesh.runtime.engine import Engine
    from pdmesh.runtime.request import Request

log = logging.getLogger(__name__)
OnEvents = Callable[[list[Any]], None]


class EngineLoop:
    """One engine, one thread. `submit` and `stats` may be called from any thread."""

    def __init__(self, engine: Engine, on_events: OnEvents, idle_wait: float = 0.05,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        """`on_failure(error)`: called once, on the loop thread, if a step (or anything
        else outside one command) raised: the engine's state is unknown then, so the
        loop stops and every queued command fails."""
        self.engine = engine
        self._on_events = on_events
        self._on_failure = on_failure
        self.error: BaseException | None = None  # what stopped the loop, if it failed
        self._idle_wait = idle_wait
        self._commands: queue.SimpleQueue[tuple[Command | None, Future]] = queue.SimpleQueue()
        self._prealloc: collections.OrderedDict[str, Request] = collections.OrderedDict()
        self._events: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._sleep = 0.0  # SlowDown
        # the runner is final by now (RankGroup.attach swaps it before any loop starts)
        self._runner_check = getattr(getattr(engine, "runner", None), "check", None)
        self._fail_next_step = False  # FailStep (fault injection)
        self._waiting_pages = False  # holds are waiting (logged once per episode)
        self._stalled = False  # the last step ran nothing: decode waits on held pages
        self._counts = {"prompt_tokens": 0, "generation_tokens": 0}
        self.stats = EngineStats()  # replaced (never mutated) after every turn

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> "EngineLoop":
        self._publish_stats()
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current step; queued commands that never ran get an error."""
        self._stop.set()
        self._commands.put((None, Future()))  # wake the thread
        self._thread.join(timeout)

    def submit(self, cmd: Command) -> Future:
        """Run `cmd` on the loop thread between steps; its result or error in a Future."""
        fut: Future = Future()
        if self._stop.is_set():
            fut.set_exception(RuntimeError(self._why_stopped()))
        else:
            self._commands.put((cmd, fut))
        return fut

    # -- commands: the one place they are handled ----------------------------------------
    def _process(self, cmd: Command) -> Any:
        eng = self.engine
        match cmd:
            case MakeRequest():
                return eng.make_request(prompt_token_ids=cmd.prompt_token_ids, params=cmd.params,
                                        request_id=cmd.request_id, mode=cmd.mode,
                                        detokenize=cmd.detokenize)
            case Start(make=make):
                req = self._process(make)
                self._process(Add(req))
                return req
            case Add(req=req):
                eng.requests[req.request_id] = req
                eng.scheduler.add(req)
            case Hold(req=req):
                self._prealloc[req.request_id] = req
                self._drain_prealloc()
            case Adopt():
                self._events.append(eng.adopt(cmd.request_id, cmd.first_token, cmd.first_logprob))
            case Abort(request_id=rid):
                queued = self._prealloc.pop(rid, None) is not None
                return eng.abort(rid) or queued
            case Release(request_id=rid):
                eng.release(rid)
            case SlowDown(seconds=s):
                self._sleep = s
            case FailStep():
                self._fail_next_step = True
            case _:
                raise TypeError(f"not an engine command: {cmd!r}")
        return None

    # -- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._turn()
        except Exception as e:  # an engine bug or a device error: its state is unknown
            log.exception("engine loop failed: this engine stops, its requests fail")
            self.error = e
            self._stop.set()
            if self._on_failure is not None:
                self._on_failure(e)
        self._fail_pending()

    def _turn(self) -> None:
        if self._runner_check is not None:  # a tensor-parallel runner: raises once a rank died
            self._runner_check()
        # stalled: decoding waits for pages held for a transfer; only a command
        # (adopt, release, abort) can change that, so wait for one
        if self._run_commands(block=not self.engine.has_unfinished() or self._stalled):
            self._stalled = False  # a command may have freed or filled pages: try
            if self._events:  # an adopt's first token goes out now, not after a step
                self._flush()
        self._drain_prealloc()  # an abort or release may have freed pages
        if self.engine.has_unfinished() and not self._stalled:
            self._step()
        self._flush()

    def _why_stopped(self) -> str:
        if self.error is None:
            return "engine loop is stopped"
        return f"the engine failed ({type(self.error).__name__}: {self.error})"

    def _step(self) -> None:
        if self._fail_next_step:
            raise RuntimeError("this step failed on purpose (pdmesh.v1.Chaos engine.fail_step)")
        outs = self.engine.step()
        self._stalled = self.engine.stalled
        for out in outs:
            self._account(out)
        self._events.extend(outs)
        if self._sleep > 0:
            time.sleep(self._sleep)

    def _flush(self) -> None:
        self._publish_stats()
        if self._events:
            events, self._events = self._events, []
            try:
                self._on_events(events)
            except Exception:  # a bug above must not stop the engine
                log.exception("event handler failed")

    def _run_commands(self, block: bool) -> bool:
        """Run every queued command (waiting up to idle_wait for one when `block`);
        True when any ran."""
        try:
            item = self._commands.get(timeout=self._idle_wait) if block else \
                self._commands.get_nowait()
        except queue.Empty:
            return False
        done: list[tuple[Future, bool, Any]] = []
        while True:
            cmd, fut = item
            if cmd is not None and fut.set_running_or_notify_cancel():
                try:
                    done.append((fut, True, self._process(cmd)))
                except BaseException as e:  # the caller gets it through the Future
                    done.append((fut, False, e))
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                break
        # invariant: when a command's future resolves, `stats` already reflects it
        self._publish_stats()
        for fut, ok, value in done:
            fut.set_result(value) if ok else fut.set_exception(value)
        return True

    def _account(self, out: Any) -> None:
        # sampled right after the prompt's last chunk; a forked sequence's prompt (n > 1)
        # is its parent's, counted once
        if len(out.token_ids) == 1 and not out.index:
            self._counts["prompt_tokens"] += len(out.prompt_token_ids)
        if not out.pages:  # a PREFILL_ONLY output's token is the decode worker's to count
            self._counts["generation_tokens"] += len(out.new_token_ids)

    def _drain_prealloc(self) -> None:
        """Admit held requests in FIFO order while they fit."""
        while self._prealloc:
            rid, req = next(iter(self._prealloc.items()))
            pages = self.engine.hold(req)
            if pages is None:
                self._note_wait(len(self._prealloc))
                return
            del self._prealloc[rid]
            cached = max(req.cached_tokens, 0) // self.engine.config.page_size
            self._events.append(Held(rid, pages, cached))
        self._note_wait(0)

    def _note_wait(self, waiting: int) -> None:
        """One log line when holds start waiting for pages, one when the queue drains."""
        if waiting and not self._waiting_pages:
            s = self.engine.stats()
            log.info("KV pages short: %d rooms wait in the pre-allocation queue (free %d, "
                     "reserved %d of %d pages)", waiting, s["free_pages"],
                     s.get("reserved_pages", 0), s["num_pages"])
        elif not waiting and self._waiting_pages:
            log.info("pre-allocation queue drained")
        self._waiting_pages = bool(waiting)

    def _publish_stats(self) -> None:
        s = self.engine.stats()
        self.stats = EngineStats(
            num_pages=s["num_pages"], free_pages=s["free_pages"], used_pages=s["used_pages"],
            reserved_pages=s.get("reserved_pages", 0), waiting=s["waiting"],
            running=s["running"], held=s["held"], prealloc_queue=len(self._prealloc),
            queued_prefill_tokens=s.get("queued_prefill_tokens", 0),
            retracted=s.get("retracted", 0), estimated_pages=s.get("estimated_pages", 0),
            forward_sleep_time=self._sleep,
            prefill_steps=s.get("prefill_steps", 0), decode_steps=s.get("decode_steps", 0),
            page_size=self.engine.config.page_size,
            max_running_requests=self.engine.config.max_running_requests, **self._counts)

    def _fail_pending(self) -> None:
        while True:
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError(self._why_stopped()))
