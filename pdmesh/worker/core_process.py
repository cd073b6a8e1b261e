"""The engine core in a process of its own (`--engine-process`), driven over one socket
by `EngineProcess` (engine_proxy.py) in the worker's RPC process.

Why: in one process the RPC event loop and the engine loop share a GIL, and a decode
step that takes 2.9 ms alone took 5.6 ms served at 64 streams (H200, 2026-11-29). Here
the engine loop has this process's GIL to itself, as vLLM's EngineCore and SGLang's
scheduler process do. The KV transport lives here too, beside the pool it reads.

Wire (multiprocessing.connection over a socketpair, pickled tuples):
  front -> core: ("cmd", id, Command)     an engine command; Add/Hold carry the request id
                 ("kv", id, op, args)     a KV data-plane call (EngineCore.kv_op)
                 ("stop",)
  core -> front: ("hello", CoreInfo, EngineStats) | ("start_failed", text)   once, first
                 ("res", id, ok, value, EngineStats)   a command's result, stats as of then
                 ("ev", [event], EngineStats)          one loop turn: Held or a packed output
                 ("kvres", id, ok, value)
                 ("failed", text)                      the engine loop failed
Commands' results and events are sent from the engine-loop thread, so the front sees
them in the order they happened.
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import os
import pickle
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from pdmesh.aio import freeze_startup_objects
from pdmesh.worker.commands import Abort, Add, Held, Hold, MakeRequest, Start

log = logging.getLogger(__name__)
KV_THREADS = int(os.environ.get("PDMESH_KV_WRITER_THREADS", "4"))
MADE_LIMIT = 65536  # requests made and not yet added: a bound, never reached in practice


def pack_output(out: Any, req: Any) -> tuple:
    """A RequestOutput without what the front already has (prompt, earlier tokens)."""
    new = out.new_token_ids
    lps = out.logprobs[len(out.token_ids) - len(new):] if out.logprobs else None
    sched = req.scheduled_time if req is not None else None
    return (out.request_id, new, out.new_text, out.finished, out.finish_reason,
            out.stop_reason, lps, out.pages, out.cached_tokens, sched, out.index)


def _front_copy(req: Any) -> Any:
    """The front's copy of a Request: without the engine's state (detokenizer, generator,
    prefix cache nodes), which it never reads."""
    return dataclasses.replace(req, detok=None, generator=None, cache_nodes=[])


class CoreServer:
    """Serves one front over `conn`: engine commands to an EngineLoop, KV calls to
    threads; returns when the front says stop or goes away."""

    def __init__(self, conn: Connection, core: Any) -> None:
        from pdmesh.worker.engine_loop import EngineLoop

        self.conn, self.core = conn, core
        self._send_lock = threading.Lock()
        self._made: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._kv = ThreadPoolExecutor(KV_THREADS, thread_name_prefix="kv")
        self._warm_kv_threads()
        self.loop = EngineLoop(core.engine, self._events, on_failure=self._failed)

    def _warm_kv_threads(self) -> None:
        """Start every KV thread now and digest pages once on each (GPU pools only). A
        thread's first GPU digest is slow (its stream, pinned memory): on an H200 the
        first 16 concurrent 1P1D requests waited 123.5 ms on average for their KV
        against 11.7 ms the next time; with this, 11.7 the first time (2026-12-01)."""
        from pdmesh.transfer.checksum import warm_up

        pool = getattr(self.core, "pool", None)
        if pool is None or pool.device.type != "cuda":
            return
        gate = threading.Barrier(KV_THREADS)  # each task holds its thread until all run

        def one() -> None:
            gate.wait(30)
            warm_up(pool)
        for f in [self._kv.submit(one) for _ in range(KV_THREADS)]:
            f.result()
        from pdmesh.transfer.cuda_ipc import warm_up as warm_page_copy

        warm_page_copy(pool)  # a scattered transfer's kernel, loaded now (not in a request)

    def send(self, msg: tuple) -> None:
        try:
            data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
            if msg[0] == "res" and not msg[2]:
                pickle.loads(data)  # an error the front could not rebuild would be lost
        except Exception as e:  # an unpicklable result or error: say what it was
            what = msg[3] if msg[0] == "res" and not msg[2] else e
            msg = msg[:2] + (False, RuntimeError(f"{type(what).__name__}: {what}")) + msg[4:]
            data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            self.conn.send_bytes(data)

    def serve(self) -> None:
        """Handle messages until stop or EOF (the loop has been started)."""
        try:
            while True:
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):  # the front is gone
                    return
                if msg[0] == "stop":
                    return
                self._handle(msg)
        finally:
            self.loop.stop()
            self._kv.shutdown(wait=False)
            self.core.close()

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "cmd":
            _, cid, cmd = msg
            try:
                fut = self.loop.submit(self._resolve(cmd))
            except KeyError as e:  # Add/Hold of a request never made here
                self.send(("res", cid, False, ValueError(f"unknown request {e}"),
                           self.loop.stats))
                return
            fut.add_done_callback(lambda f: self._reply(cid, cmd, f))
        elif msg[0] == "kv":
            _, kid, op, args = msg
            self._kv.submit(self._kv_call, kid, op, args)
        else:
            log.error("engine core: unknown message %r", msg[0])

    def _resolve(self, cmd: Any) -> Any:
        """Add/Hold name a request made earlier (MakeRequest): the engine's own object."""
        if isinstance(cmd, (Add, Hold)) and isinstance(cmd.req, str):
            return type(cmd)(self._made.pop(cmd.req))
        if isinstance(cmd, Abort):
            self._made.pop(cmd.request_id, None)
        return cmd

    def _reply(self, cid: int, cmd: Any, fut: Future) -> None:
        err = fut.exception()
        value = None if err is not None else fut.result()
        if err is None and isinstance(cmd, MakeRequest):
            value = self._keep(value)
        elif err is None and isinstance(cmd, Start):  # queued already: the engine has it
            value = _front_copy(value)
        self.send(("res", cid, err is None, err if err is not None else value,
                   self.loop.stats))

    def _keep(self, req: Any) -> Any:
        """Keep the engine's Request; the front gets a copy without engine state."""
        self._made[req.request_id] = req
        while len(self._made) > MADE_LIMIT:
            self._made.popitem(last=False)
        return _front_copy(req)

    def _kv_call(self, kid: int, op: str, args: tuple) -> None:
        try:
            msg = ("kvres", kid, True, self.core.kv_op(op, args))
        except BaseException as e:  # the caller gets it
            msg = ("kvres", kid, False, e)
        self.send(msg)

    # -- from the engine-loop thread -----------------------------------------------------
    def _events(self, events: list[Any]) -> None:
        reqs = self.core.engine.requests
        packed = [ev if isinstance(ev, Held) else pack_output(ev, reqs.get(ev.request_id))
                  for ev in events]
        self.send(("ev", packed, self.loop.stats))

    def _failed(self, error: BaseException) -> None:
        """The engine's state is unknown: say why, then exit (the worker exits too)."""
        try:
            self.send(("failed", f"{type(error).__name__}: {error}"))
        finally:
            os._exit(1)


def _die_with_parent() -> None:
    """SIGKILL this process when the RPC process dies (Linux), even by kill -9."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    """`python -m pdmesh.worker.core_process FD`: FD is this end of the socketpair."""
    _die_with_parent()
    # a Ctrl-C or SIGTERM to the whole process group is for the worker, which drains its
    # requests and then says stop: the core must outlive that drain
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(int(argv[0]))
    worker_cfg, engine_cfg, use_transport, log_level, switch = conn.recv()
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    sys.setswitchinterval(switch)
    from pdmesh.worker.core import EngineCore, process_age_s

    age = process_age_s()  # the interpreter's start and this module's imports
    try:
        core = EngineCore(worker_cfg, engine_cfg, use_transport)
    except Exception as e:  # the front prints it and exits like an in-process start
        log.exception("engine core failed to start")
        conn.send(("start_failed", f"{type(e).__name__}: {e}"))
        return 1
    if age is not None:
        core.phases.insert(0, ("engine process start", age))
    t = time.monotonic()
    server = CoreServer(conn, core)
    server.loop.start()  # publishes the first stats: the worker registers with them
    freeze_startup_objects()  # no 100+ ms full collections over the model's objects
    core.phases.append(("engine loop start, gc freeze", time.monotonic() - t))
    server.send(("hello", core.info(), server.loop.stats))
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
