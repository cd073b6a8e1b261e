"""The engine loop seen from one asyncio event loop: awaitable commands, output streams.

    engine = AsyncEngine(Engine(...))          # inside a running event loop
    req = await engine.make_request(ids, params, "42", Mode.GENERATE)
    stream = engine.add(req)                   # OutputStream
    outs = await stream.next_batch()

Events from the loop thread arrive in one `call_soon_threadsafe` per step and are
routed here to the request's stream or pending hold. This is the worker's `io` adapter
for the engine: the P/D protocol above talks only to it (or to a fake with the same
methods in unit tests).
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence

from pdmesh.runtime.fork import member_ids
from pdmesh.worker.commands import (Abort, Add, Adopt, EngineStats, FailStep, Held, Hold,
                                    MakeRequest, Release, SlowDown, Start)
from pdmesh.worker.engine_loop import EngineLoop
from pdmesh.worker.failure import FailureListeners
from pdmesh.worker.streams import EngineFailed, OutputStream, StreamClosed


class AsyncEngine:
    """Owns the EngineLoop thread; every method runs on the event loop it was built in."""

    def __init__(self, engine: Any = None, process: Any = None) -> None:
        """Drive `engine` on an EngineLoop thread of this process, or the engine core in
        `process` (pdmesh.worker.engine_proxy.EngineProcess, same interface)."""
        self._failure = FailureListeners()  # told on this event loop if the engine fails
        self._aio = asyncio.get_running_loop()
        self._streams: dict[str, OutputStream] = {}
        self._holds: dict[str, asyncio.Future] = {}
        self._families: dict[str, tuple[str, ...]] = {}  # n > 1: parent id -> every id
        if process is not None:  # its replies are read on this loop: no thread hop
            info = process.info
            self.engine_config, self.model_config = info.engine_config, info.model_config
            self.tokenizer = info.tokenizer
            self.core = process.bind(self._route, self._failed)
            return
        self.engine_config = engine.config
        self.model_config = engine.model_config
        self.tokenizer = engine.tokenizer
        self.core = EngineLoop(engine, self._from_thread,
                               on_failure=self._failed_from_thread).start()

    # -- commands ------------------------------------------------------------------------
    async def make_request(self, prompt_token_ids: Sequence[int], params: Any,
                           request_id: str, mode: Any, detokenize: bool = False) -> Any:
        """A validated Request (ValueError saying what is wrong); nothing is queued.
        Outputs carry text only with `detokenize` (or stop strings to match)."""
        return await self._call(MakeRequest(list(prompt_token_ids), params, request_id, mode,
                                            detokenize))

    async def start(self, prompt_token_ids: Sequence[int], params: Any, request_id: str,
                    mode: Any, detokenize: bool = False) -> tuple[Any, OutputStream]:
        """make_request + add in one trip to the engine: (the Request, its stream). A
        ValueError says what is wrong, and then nothing was queued."""
        stream = self._open(request_id, getattr(params, "n", 1))
        try:
            req = await self._call(Start(MakeRequest(list(prompt_token_ids), params, request_id,
                                                     mode, detokenize)))
        except ValueError:
            self._forget(request_id)
            raise
        except BaseException:  # cancelled: it may be queued already, the Abort follows it
            self.abort(request_id)
            raise
        return req, stream

    def add(self, req: Any) -> OutputStream:
        """Queue `req`; its outputs arrive in the returned stream (with n > 1, every
        sequence's: each output's `index` says which)."""
        stream = self._open(req.request_id, getattr(req.params, "n", 1))
        self.core.submit(Add(req))
        return stream

    def _open(self, request_id: str, n: int) -> OutputStream:
        """One stream for the request's n sequences (runtime/fork.py's request ids)."""
        ids = tuple(member_ids(request_id, n))
        stream = OutputStream(ids)
        for rid in ids:
            self._streams[rid] = stream
        if n > 1:
            self._families[request_id] = ids
        return stream

    async def hold(self, req: Any) -> "HeldPages":
        """Pages for an ADOPTED request, once the pool has them (FIFO); their
        `cached_pages` first ones hold cached KV already. Cancelling the wait takes the
        request out of the queue (or frees the pages if they came)."""
        fut = self._holds[req.request_id] = self._aio.create_future()
        self.core.submit(Hold(req))
        try:
            return await fut
        except asyncio.CancelledError:
            self._holds.pop(req.request_id, None)
            self.abort(req.request_id)
            raise

    async def adopt(self, request_id: str, first_token: int, first_logprob: Any,
                    n: int = 1) -> OutputStream:
        """Start decoding a held request; the first token's output is the stream's first.
        `n`: its SamplingParams.n (the engine forks its other sequences now)."""
        stream = self._open(request_id, n)
        try:
            await self._call(Adopt(request_id, first_token, first_logprob))
        except BaseException:
            self._forget(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> asyncio.Future:
        """End the request wherever it is, every sequence of it; its stream (if any) is
        closed. The Future: whether the engine knew the request (its first sequence)."""
        ids, stream = self._forget(request_id)
        if stream is not None:
            stream.close(StreamClosed(f"request {request_id} was aborted"))
        # the parent first: once it is gone it can fork no more sequences
        futs = [self.core.submit(Abort(rid)) for rid in ids]
        return asyncio.wrap_future(futs[0], loop=self._aio)

    def _forget(self, request_id: str) -> tuple[list[str], OutputStream | None]:
        """Drop the request's streams (every sequence's, n > 1): its ids and its stream."""
        ids = self._families.pop(request_id, (request_id,))
        streams = [s for s in (self._streams.pop(rid, None) for rid in ids) if s is not None]
        return list(ids), (streams[0] if streams else None)

    def release(self, request_id: str) -> asyncio.Future:
        """Free a finished PREFILL_ONLY request's pages."""
        self._streams.pop(request_id, None)
        return asyncio.wrap_future(self.core.submit(Release(request_id)), loop=self._aio)

    async def slow_down(self, seconds: float) -> None:
        await self._call(SlowDown(seconds))

    async def fail_next_step(self) -> None:
        """Fault injection: the engine's next forward step raises (see EngineLoop)."""
        await self._call(FailStep())

    def add_failure_listener(self, fn: Callable[[BaseException], object]) -> None:
        """Call fn(error) once, on this event loop, if the engine fails (after every
        stream and pending hold has ended with EngineFailed). Listeners are called in
        the order added; one that raises is logged and does not stop the others."""
        self._failure.add(fn)

    @property
    def stats(self) -> EngineStats:
        """The engine's counters as of the last loop turn (never waits on a step)."""
        return self.core.stats

    def stop(self) -> None:
        self.core.stop()

    # -- events from the loop thread -----------------------------------------------------
    async def _call(self, cmd: Any) -> Any:
        return await asyncio.wrap_future(self.core.submit(cmd), loop=self._aio)

    def _from_thread(self, events: list[Any]) -> None:
        if not self._aio.is_closed():
            self._aio.call_soon_threadsafe(self._route, events)

    def _failed_from_thread(self, error: BaseException) -> None:
        if not self._aio.is_closed():
            self._aio.call_soon_threadsafe(self._failed, error)

    def _failed(self, error: BaseException) -> None:
        """The engine stopped: every stream and pending hold ends with EngineFailed."""
        err = EngineFailed(f"the engine failed ({type(error).__name__}: {error})")
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.close(err)
        holds, self._holds = self._holds, {}
        for fut in holds.values():
            if not fut.done():
                fut.set_exception(err)
        self._failure.notify(error)

    def _route(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, Held):
                self._held(ev)
                continue
            stream = self._streams.get(ev.request_id)
            if stream is not None:
                stream.put(ev)
                if ev.finished:
                    del self._streams[ev.request_id]
                    if stream.finished and len(stream.ids) > 1:
                        self._families.pop(stream.ids[0], None)

    def _held(self, ev: Held) -> None:
        fut = self._holds.pop(ev.request_id, None)
        if fut is None or fut.done():  # nobody waits any more: give the pages back
            self.core.submit(Abort(ev.request_id))
        else:
            fut.set_result(HeldPages(ev.pages, ev.cached_pages))


class HeldPages(list):
    """A held request's page ids (a list) and `cached_pages`: how many leading ones hold
    the prompt's KV already (the decode's prefix cache), so only the rest are written."""

    def __init__(self, pages: list[int], cached_pages: int = 0) -> None:
        super().__init__(pages)
        self.cached_pages = cached_pages
