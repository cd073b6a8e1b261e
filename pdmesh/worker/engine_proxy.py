"""The RPC process's side of `--engine-process`: an engine core in a child process
(core_process.py) seen through the EngineLoop's interface (`submit`, `stats`, `stop`,
`error`), plus `RemoteRouter`, the KV data plane's Router interface over the same
socket. No grpc, no torch.

    proc = EngineProcess(worker_cfg, engine_cfg, use_transport)  # blocks until ready
    proc.bind(on_events, on_failure)       # inside the running event loop
    fut = proc.submit(Add(req))            # concurrent.futures.Future

Replies are read on the event loop (`add_reader` on the socket), so events reach
`on_events` on the loop's thread with no thread hop. `kv_call` may be called from any
thread; only its Future's result is set on the loop's thread.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any, Callable

from pdmesh.worker.commands import Abort, Add, EngineStats, Hold, Release, Start

log = logging.getLogger(__name__)


def _import_tokenizer_classes() -> None:
    try:
        import transformers

        transformers.PreTrainedTokenizerFast  # a lazy module: the attribute imports it
    except Exception:  # the hello's unpickling says what is wrong, if anything
        pass


class EngineProcessError(RuntimeError):
    """The engine process failed to start, failed, or exited."""


class EngineProcess:
    """An engine core in a child process; the EngineLoop interface over one socket."""

    def __init__(self, worker_cfg: Any, engine_cfg: Any, use_transport: bool) -> None:
        """Start the child and wait until its engine is built (raises EngineProcessError
        with the child's reason if it could not start)."""
        # the hello carries the tokenizer: unpickling it imports transformers' tokenizer
        # classes (1 s on the dev CPU, more on an H200 host), done here while the child
        # builds its engine instead of after
        threading.Thread(target=_import_tokenizer_classes, daemon=True).start()
        mine, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pdmesh.worker.core_process", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env=os.environ.copy())
        theirs.close()
        self.conn = Connection(mine.detach())
        self.conn.send((worker_cfg, engine_cfg, use_transport,
                        logging.getLogger().getEffectiveLevel(),
                        worker_cfg.gil_switch_interval_s))
        hello = self._recv_or_none()
        if hello is None or hello[0] != "hello":
            self.proc.wait(10)
            why = hello[1] if hello else f"exited with code {self.proc.returncode}"
            raise EngineProcessError(f"the engine process did not start: {why}")
        self.info = hello[1]
        self.stats: EngineStats = hello[2]  # as of its start: what registration reports
        self.error: BaseException | None = None
        self._ids = itertools.count()
        self._pending: dict[int, Future] = {}
        self._send_lock = threading.Lock()
        self._acc: dict[str, list] = {}  # per request: [token ids, logprobs, text] so far
        self._reqs: dict[str, Any] = {}  # the front's Request copies (scheduled_time)
        self._on_events: Callable[[list[Any]], None] | None = None
        self._on_failure: Callable[[BaseException], None] | None = None
        self._aio: asyncio.AbstractEventLoop | None = None
        self._stopping = False  # stop() was called: the EOF that follows is no failure

    def _recv_or_none(self) -> tuple | None:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return None

    def bind(self, on_events: Callable[[list[Any]], None],
             on_failure: Callable[[BaseException], None]) -> "EngineProcess":
        """Deliver events and a failure to these, on the running event loop's thread."""
        self._on_events, self._on_failure = on_events, on_failure
        self._aio = asyncio.get_running_loop()
        self._fd = self.conn.fileno()
        self._aio.add_reader(self._fd, self._readable)
        return self

    # -- the EngineLoop interface ---------------------------------------------------------
    def submit(self, cmd: Any) -> Future:
        """Run `cmd` in the core, between its steps; its result or error in a Future."""
        if isinstance(cmd, (Add, Hold)):
            self._reqs[cmd.req.request_id] = cmd.req
            cmd = type(cmd)(cmd.req.request_id)
        elif isinstance(cmd, (Abort, Release)):
            self._acc.pop(cmd.request_id, None)
            self._reqs.pop(cmd.request_id, None)
        fut = self._send("cmd", cmd)
        if isinstance(cmd, Start):
            fut.add_done_callback(self._started)
        return fut

    def kv_call(self, op: str, *args: Any) -> Future:
        """A KV data-plane call in the core (EngineCore.kv_op); any thread."""
        return self._send("kv", op, args)

    def kv_op(self, op: str, args: tuple) -> Any:
        """EngineCore.kv_op across the socket: blocks, so never on the event loop (whose
        thread resolves the reply)."""
        return self.kv_call(op, *args).result()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the core (its engine loop, its transport) and wait for it to exit; any
        thread. The event loop closes the socket when it reads the EOF."""
        self._stopping = True
        try:
            with self._send_lock:
                self.conn.send(("stop",))
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._fail_pending(EngineProcessError("the engine process was stopped"))
        if self._aio is None or self._aio.is_closed():
            self.conn.close()

    # -- internals -------------------------------------------------------------------------
    def _send(self, kind: str, *body: Any) -> Future:
        fut: Future = Future()
        if self.error is not None:
            fut.set_exception(self.error)
            return fut
        mid = next(self._ids)
        self._pending[mid] = fut
        try:
            with self._send_lock:
                self.conn.send((kind, mid) + body)
        except OSError as e:
            self._pending.pop(mid, None)
            fut.set_exception(EngineProcessError(f"the engine process is gone ({e})"))
        if self.error is not None and self._pending.pop(mid, None) is not None:
            fut.set_exception(self.error)  # it died while we sent: nobody would answer
        return fut

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):
                    raise
                except Exception as e:  # a message we cannot read: its caller would wait
                    self._die(EngineProcessError(f"unreadable message from the engine "
                                                 f"process: {type(e).__name__}: {e}"))
                    return
                self._handle(msg)
        except (EOFError, OSError):
            self._aio.remove_reader(self._fd)
            self.conn.close()
            if self._stopping:
                return
            try:
                code = self.proc.wait(1)
            except subprocess.TimeoutExpired:
                code = None
            self._die(EngineProcessError(f"the engine process exited (code {code})"))

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ev":
            self.stats = msg[2]
            self._on_events([self._unpack(ev) for ev in msg[1]])
        elif kind in ("res", "kvres"):
            if kind == "res":
                self.stats = msg[4]
            fut = self._pending.pop(msg[1], None)
            if fut is not None and fut.set_running_or_notify_cancel():
                fut.set_result(msg[3]) if msg[2] else fut.set_exception(msg[3])
        elif kind == "failed":
            self._die(EngineProcessError(msg[1]))

    def _started(self, fut: Future) -> None:
        """A Start's reply, as it is read: its events may follow in this same read, before
        the caller runs, so the front's copy is registered now (scheduled_time lands on
        it). A concurrent Future runs this callback inside set_result."""
        if not fut.cancelled() and fut.exception() is None:
            req = fut.result()
            self._reqs[req.request_id] = req

    def _unpack(self, ev: Any) -> Any:
        if not isinstance(ev, tuple):
            return ev  # Held
        from pdmesh.runtime.request import RequestOutput

        rid, new, new_text, finished, reason, stop_reason, lps, pages, cached, sched, i = ev
        acc = self._acc.setdefault(rid, [[], [], ""])
        ids, logprobs = acc[0], acc[1]
        ids.extend(new)
        if lps:
            logprobs.extend(lps)
        if new_text:  # only when the engine detokenizes (stop strings, tests)
            acc[2] += new_text
        req = self._reqs.get(rid)
        if req is not None and sched is not None and req.scheduled_time is None:
            req.scheduled_time = sched
        if finished:
            self._acc.pop(rid, None)
            self._reqs.pop(rid, None)
        return RequestOutput(rid, [], ids, acc[2], new, new_text, finished, reason,
                             stop_reason, logprobs or None, pages, cached, i)

    def _die(self, error: BaseException) -> None:
        if self.error is not None:
            return
        self.error = error
        if self._aio is not None:
            self._aio.remove_reader(self._fd)
        self._fail_pending(error)
        if self._on_failure is not None:
            self._on_failure(error)

    def _fail_pending(self, error: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if fut.set_running_or_notify_cancel():
                fut.set_exception(error)


class RemoteRouter:
    """pdmesh.transfer.route.Router's interface for TransportWriter, over the engine
    process that owns the pool. Blocking calls: writer threads only, never the event
    loop (whose thread resolves their Futures)."""

    def __init__(self, proc: EngineProcess) -> None:
        self.proc, self.algo = proc, proc.info.algo
        self._paths: dict[tuple[str, int], str] = {}  # the bound route's name per pool

    def write_pages(self, dst: Any, src_pages: list[int], dst_pages: list[int]) -> Any:
        stats = self.proc.kv_op("write", (dst, list(src_pages), list(dst_pages)))
        self._paths[(dst.session_id, dst.kv_base)] = stats.path
        return stats

    def corrupt_page(self, dst: Any, src_page: int, dst_page: int) -> None:
        self.proc.kv_op("corrupt", (dst, src_page, dst_page))

    def checksum_pages(self, dst: Any, dst_pages: list[int], algo: str) -> int:
        return self.proc.kv_op("read_checksum", (dst, list(dst_pages), algo))

    def source_checksum(self, pages: list[int], algo: str) -> int:
        return self.proc.kv_op("checksum", (list(pages), algo))

    def route_name(self, dst: Any) -> str | None:
        """The route's name as of the last write to dst (no round trip: the event loop
        calls this)."""
        return self._paths.get((dst.session_id, dst.kv_base))

    def forget(self, session_id: str) -> None:
        """The peer left: the core drops its routes (not waited for)."""
        self._paths = {k: v for k, v in self._paths.items() if k[0] != session_id}
        self.proc.kv_call("forget", session_id)

    def close(self) -> None:
        """Nothing here: the core closes its routes when it stops."""
