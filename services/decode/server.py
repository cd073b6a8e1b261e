"""`pdmesh.v1.Decode`: admits rooms, pulls their KV from the prefill, streams tokens.

Servicer threads only submit commands to the EngineLoop and read the room's output
queue; the loop's callback only puts into that queue, so a slow consumer never blocks
decoding (it gets several tokens per message instead). Pages a prefill may still be
writing are quarantined until that prefill confirms the abort or its lease expires.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time

import grpc

from pdmesh.grpc_util import Servicer, create_server as _create_grpc_server, service_name
from pdmesh.runtime.request import Mode
from pdmesh.telemetry import tracing
from pdmesh.v1 import decode_pb2 as pb
from pdmesh.v1 import decode_pb2_grpc as pb_grpc
from pdmesh.v1 import prefill_pb2 as ppb
from pdmesh.v1 import prefill_pb2_grpc as ppb_grpc
from pdmesh.v1 import registry_pb2 as rpb
from pdmesh.worker.convert import logprob_from_proto, sampling_from_proto, validate_token_ids
from pdmesh.services.common.worker import WorkerHost
from pdmesh.services.decode.chunks import first_chunk_timings, make_chunk
from pdmesh.services.decode.rooms import DecodeRoom, DecodeRooms, RoomFailed

log = logging.getLogger(__name__)
SERVICE_NAME = service_name(pb, "Decode")
ABORT_RPC_TIMEOUT_S = 2.0
QUARANTINE_RETRY_S = 1.0
# Transfer errors from the prefill passed through as they are; the rest become UNAVAILABLE.
_PASS_THROUGH = {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "DEADLINE_EXCEEDED"}


class DecodeServicer(pb_grpc.DecodeServicer):
    """The Decode RPCs over one WorkerHost. PD rooms need the host's transport."""

    def __init__(self, host: WorkerHost) -> None:
        self.host, self.loop, self.engine = host, host.loop, host.engine
        self.rooms = DecodeRooms()
        self._channels: dict[str, ppb_grpc.PrefillStub] = {}
        self._channels_lock = threading.Lock()
        self._stop = threading.Event()
        self._finished_lock = threading.Lock()
        self.finished = 0  # streams that ended with a finish reason, cumulative (Stats)
        threading.Thread(target=self._retry_quarantine, name="quarantine", daemon=True).start()

    # -- RPCs ----------------------------------------------------------------------------
    def Generate(self, request: pb.DecodeRequest, context):
        """Stream the room's tokens: KV from the prefill (or computed here when colocated)."""
        try:
            ids = validate_token_ids(request.token_ids, self.engine.model_config.vocab_size)
            params = sampling_from_proto(request.sampling_params)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        colocated = not request.prefill_address
        if not colocated and self.host.transport is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "this worker is colocated (no KV transfer); send an empty prefill_address")
        room = self.rooms.add(request.room, request.prefill_address)
        if room is None:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"room {request.room} is already live")
        try:
            yield from self._serve(room, ids, params, colocated, context)
        except RoomFailed as e:
            self._cleanup(room)
            context.abort(getattr(grpc.StatusCode, e.code), e.message)
        finally:
            self._cleanup(room)

    def _serve(self, room: DecodeRoom, ids, params, colocated: bool, context):
        mode = Mode.GENERATE if colocated else Mode.ADOPTED
        try:
            req = self.loop.call(lambda: self.engine.make_request(
                prompt_token_ids=ids, params=params, request_id=room.request_id,
                mode=mode)).result()
        except ValueError as e:
            raise RoomFailed("INVALID_ARGUMENT", str(e)) from None
        # runs on every termination; a cancel mid-way frees the room from its own thread
        context.add_callback(lambda: self._on_rpc_done(room))
        cached, timings = 0, None
        if colocated:
            self.loop.add(req, room.outputs.put)
        else:
            try:
                cached, timings = self._pull_kv(room, req)
            except RoomFailed as e:
                if e.code == "DEADLINE_EXCEEDED":  # pages or KV later than the waiting timeout
                    self.host.metrics.waiting_timeouts.inc()
                raise
        yield from self._stream(room, len(ids), cached, context, timings)

    def Abort(self, request: pb.DecodeAbortRequest, context) -> pb.DecodeAbortResponse:
        """End the room's stream (CANCELLED) and free its pages (quarantined if needed)."""
        room = self.rooms.get(request.room)
        if room is None:
            return pb.DecodeAbortResponse(aborted=False)
        room.fail("CANCELLED", f"room {request.room} was aborted")
        threading.Thread(target=self._cleanup, args=(room,), daemon=True).start()
        return pb.DecodeAbortResponse(aborted=True)

    def SlowDown(self, request: pb.SlowDownRequest, context) -> pb.SlowDownResponse:
        """Sleep this long after every forward (decode-capacity measurement); 0 = none."""
        t = request.forward_sleep_time
        if not (math.isfinite(t) and 0 <= t <= 60):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"forward_sleep_time must be in [0, 60] seconds, got {t}")
        self.loop.forward_sleep_time = t
        return pb.SlowDownResponse(forward_sleep_time=t)

    def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        """Pages (free + used + quarantined = total), running, queued, SlowDown sleep."""
        s = self.snapshot()
        return pb.StatsResponse(
            total_pages=s["num_pages"], free_pages=s["free_pages"], used_pages=s["used_pages"],
            quarantined_pages=s["quarantined_pages"], running=s["running"], queued=s["queued"],
            forward_sleep_time=self.loop.forward_sleep_time, finished_requests=s["finished"])

    def snapshot(self) -> dict[str, int]:
        """Pages, running and queued requests, token and request counters."""
        s = self.host.read_engine("stats", lambda: {**self.engine.stats(),
                                                     "prealloc_queue": self.loop.prealloc_len})
        q_pages, q_rooms = self.rooms.quarantined_pages(), len(self.rooms.quarantined())
        return {"num_pages": s["num_pages"], "free_pages": s["free_pages"],
                "used_pages": s["used_pages"] - q_pages, "quarantined_pages": q_pages,
                "running": s["running"] - s["held"],
                "queued": s["held"] - q_rooms + s["prealloc_queue"] + s["waiting"],
                "page_size": self.engine.config.page_size, "finished": self.finished,
                "prompt_tokens": self.loop.prompt_tokens,
                "generation_tokens": self.loop.generation_tokens}

    # -- the PD path ---------------------------------------------------------------------
    def _pull_kv(self, room: DecodeRoom, req) -> tuple[int, dict[str, float]]:
        """Hold pages, call the prefill's Transfer, adopt; returns the cached-token count
        and the time stamps (monotonic) of arrival, pages held and KV written."""
        t0 = time.monotonic()
        deadline = t0 + self.host.config.waiting_timeout
        self.loop.hold(req, lambda pages: (setattr(room, "pages", pages), room.wake.set()))
        try:
            self._wait(room, lambda: room.pages is not None, deadline,
                       f"no KV pages became free for room {room.room} within the waiting timeout")
        finally:
            t_pages = time.monotonic()
            tracing.record_span("decode.admission", t0, t_pages,
                                {"pdmesh.room": room.request_id,
                                 "pdmesh.kv.pages": len(room.pages or [])})
        self.host.metrics.admission_wait.observe(t_pages - t0)
        resp = self._transfer(room, deadline)
        t_kv = time.monotonic()
        lp = logprob_from_proto(resp.first_logprob) if resp.HasField("first_logprob") else None
        self.loop.adopt(room.request_id, resp.first_token_id, lp, room.outputs.put).result()
        return resp.cached_tokens, {"arrival": t0, "pages": t_pages, "kv": t_kv}

    def _transfer(self, room: DecodeRoom, deadline: float) -> ppb.TransferResponse:
        """Ask the prefill to write the room's KV into its held pages; wait for the answer."""
        stub = self._prefill(room.prefill_address)
        with room.lock:  # a cleanup from here on knows the prefill may be writing
            if room.closed or room.error:
                raise room.error or RoomFailed("CANCELLED", "room closed")
            room.transfer_sent = True
            fut = stub.Transfer.future(self._transfer_request(room),
                                       timeout=max(0.0, deadline - time.monotonic()))
        fut.add_done_callback(lambda _: room.wake.set())
        try:
            self._wait(room, fut.done, None, "")
        except RoomFailed:
            fut.cancel()
            raise
        resp = self._transfer_result(room, fut)
        with room.lock:
            if room.closed or room.error:
                raise room.error or RoomFailed("CANCELLED", "room closed")
            room.kv_done = True
        return resp

    def _transfer_result(self, room: DecodeRoom, fut) -> ppb.TransferResponse:
        try:
            return fut.result()
        except grpc.RpcError as e:
            code = e.code().name
            if code == "DEADLINE_EXCEEDED":
                msg = (f"the KV of room {room.room} did not arrive from {room.prefill_address} "
                       f"within the waiting timeout ({self.host.config.waiting_timeout:g}s)")
            else:
                msg = f"prefill {room.prefill_address} failed room {room.room}: {code}: {e.details()}"
            raise RoomFailed(code if code in _PASS_THROUGH else "UNAVAILABLE", msg) from None

    def _transfer_request(self, room: DecodeRoom) -> ppb.TransferRequest:
        lay, host = self.host.layout, self.host
        return ppb.TransferRequest(
            room=room.room, decode_worker_id=host.registry.worker_id if host.registry else "",
            dst_session_id=host.transport.session_id, dst_kv_base_address=host.kv_base,
            dst_page_ids=room.pages, model_id=lay.model, dtype=lay.dtype,
            page_size=lay.page_size, num_layers=lay.num_layers, num_kv_heads=lay.num_kv_heads,
            head_dim=lay.head_dim, bytes_per_page=lay.bytes_per_page)

    def _wait(self, room: DecodeRoom, done, deadline: float | None, timeout_msg: str) -> None:
        """Block until done() or the room failed (RoomFailed) or the deadline passed."""
        while not done():
            if room.error is not None:
                raise room.error
            if room.prefill_address and self.host.watcher and \
                    self.host.watcher.is_gone(room.prefill_address):
                raise RoomFailed("UNAVAILABLE", f"prefill worker {room.prefill_address} expired "
                                 f"while room {room.room} waited for its KV")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise RoomFailed("DEADLINE_EXCEEDED", timeout_msg)
            room.wake.wait(0.5 if left is None else min(left, 0.5))
            room.wake.clear()

    # -- streaming -----------------------------------------------------------------------
    def _stream(self, room: DecodeRoom, prompt_len: int, cached: int, context,
                 stamps: dict[str, float] | None = None):
        first = True
        while True:
            try:
                outs = [room.outputs.get(timeout=0.5)]
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            while True:  # the consumer was slow: merge everything that is ready
                try:
                    outs.append(room.outputs.get_nowait())
                except queue.Empty:
                    break
            if any(o is None for o in outs):
                raise room.error or RoomFailed("CANCELLED", f"room {room.room} was aborted")
            chunk = make_chunk(outs, prompt_len, cached, self.engine.tokenizer)
            if first and stamps is not None:
                first_chunk_timings(chunk, room.request_id, stamps)
            first = False
            if outs[-1].finished:
                room.finished = True
                with self._finished_lock:
                    self.finished += 1
                yield chunk
                return
            yield chunk

    # -- cleanup and quarantine ----------------------------------------------------------
    def _on_rpc_done(self, room: DecodeRoom) -> None:
        if not room.finished:
            room.fail("CANCELLED", f"room {room.room}: the client cancelled")
            threading.Thread(target=self._cleanup, args=(room,), daemon=True).start()

    def _cleanup(self, room: DecodeRoom) -> None:
        """Free the room once (idempotent); pages a prefill may be writing are quarantined."""
        with room.lock:
            if room.closed:
                return
            room.closed = True
            writing = room.transfer_sent and not room.kv_done
        self.rooms.remove(room.room)
        if room.finished:
            return
        if writing:
            self.rooms.quarantine(room.request_id, room.prefill_address, len(room.pages or []))
            if self._confirm_abort(room.prefill_address, room.room):
                self._unquarantine(room.request_id)
        else:
            self.loop.abort(room.request_id)

    def _confirm_abort(self, address: str, room: int) -> bool:
        """True once the prefill confirmed the room is aborted, or its lease expired."""
        watcher = self.host.watcher
        if watcher is not None and watcher.is_gone(address):
            return True
        try:
            self._prefill(address).Abort(ppb.PrefillAbortRequest(room=room),
                                         timeout=ABORT_RPC_TIMEOUT_S)
            return True
        except grpc.RpcError:
            return watcher is not None and watcher.is_gone(address)

    def _unquarantine(self, request_id: str) -> None:
        if self.rooms.release(request_id):
            self.loop.abort(request_id)

    def _retry_quarantine(self) -> None:
        while not self._stop.wait(QUARANTINE_RETRY_S):
            for rid, (address, _) in self.rooms.quarantined().items():
                if self._confirm_abort(address, int(rid)):
                    self._unquarantine(rid)

    def peer_gone(self, event: str, address: str) -> None:
        """Registry watch: a prefill expired or left. Rooms waiting on it fail at once;
        its quarantined pages are free to reuse (its lease is over)."""
        for room in self.rooms.waiting_on(address):
            room.fail("UNAVAILABLE", f"prefill worker {address} {event.lower()} while room "
                      f"{room.room} waited for its KV")
        for rid, (addr, _) in self.rooms.quarantined().items():
            if addr == address:
                self._unquarantine(rid)

    def _prefill(self, address: str) -> ppb_grpc.PrefillStub:
        with self._channels_lock:
            if address not in self._channels:
                self._channels[address] = ppb_grpc.PrefillStub(
                    tracing.traced_channel(grpc.insecure_channel(address)))
            return self._channels[address]

    def load(self) -> rpb.LoadReport:
        """Heartbeat load: running, queued, free (not held, not quarantined) pages."""
        s = self.snapshot()
        return rpb.LoadReport(running=s["running"], queued=s["queued"],
                              free_kv_pages=s["free_pages"])

    def close(self) -> None:
        self._stop.set()


def create_server(addr: str, host: WorkerHost, interceptors=()
                  ) -> tuple[grpc.Server, int, DecodeServicer, object]:
    """Serve Decode (+ health, reflection) on `addr`; returns (server, port, servicer, health)."""
    servicer = DecodeServicer(host)
    server, port, health = _create_grpc_server(
        addr, [Servicer(servicer, pb_grpc.add_DecodeServicer_to_server, SERVICE_NAME)],
        interceptors=interceptors)
    return server, port, servicer, health
