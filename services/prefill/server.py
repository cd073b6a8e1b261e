"""`pdmesh.v1.Prefill`: runs prompts, writes their KV into decode workers, returns token 1.

Servicer threads only enqueue work on the EngineLoop and wait on room conditions; the
KV write itself runs on the Transfer RPC's thread (Mooncake releases the GIL), never
on the engine loop. Room life cycle and its invariants: services/prefill/rooms.py.
"""
from __future__ import annotations

import logging
import threading
import time

import grpc

from pdmesh.grpc_util import Servicer, create_server as _create_grpc_server, service_name
from pdmesh.runtime.request import Mode
from pdmesh.telemetry import tracing
from pdmesh.transfer import KVLayout, check_compatible
from pdmesh.v1 import prefill_pb2 as pb
from pdmesh.v1 import prefill_pb2_grpc as pb_grpc
from pdmesh.v1 import registry_pb2 as rpb
from pdmesh.worker.convert import logprob_to_proto, sampling_from_proto, validate_token_ids
from pdmesh.services.common.worker import WorkerHost
from pdmesh.services.prefill import rooms as R

log = logging.getLogger(__name__)
SERVICE_NAME = service_name(pb, "Prefill")


class PrefillServicer(pb_grpc.PrefillServicer):
    """The Prefill RPCs over one WorkerHost (engine loop + transport)."""

    def __init__(self, host: WorkerHost) -> None:
        self.host, self.loop, self.engine = host, host.loop, host.engine
        self.rooms = R.RoomTable()
        self.bootstrap_timeout = host.config.bootstrap_timeout
        self._counts_lock = threading.Lock()
        self.transferred = self.failed = 0  # rooms, cumulative (Stats)

    # -- RPCs ----------------------------------------------------------------------------
    def Prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillResponse:
        """Queue the prompt at once; return when its KV is in the decode worker (or failed)."""
        try:
            ids = validate_token_ids(request.token_ids, self.engine.model_config.vocab_size)
            params = sampling_from_proto(request.sampling_params)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        room = self.rooms.get_or_create(request.room)
        if room is None:
            context.abort(grpc.StatusCode.CANCELLED, f"room {request.room} was aborted")
        if room.has_prefill:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"room {request.room} is already prefilling")
        try:
            req = self.loop.call(lambda: self.engine.make_request(
                prompt_token_ids=ids, params=params, request_id=str(request.room),
                mode=Mode.PREFILL_ONLY)).result()
        except ValueError as e:
            self._drop(room, "INVALID_ARGUMENT", str(e))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        R.update(room, has_prefill=True, req=req, decode_address=request.decode_address)
        context.add_callback(lambda: self._drop(room, "CANCELLED", "Prefill was cancelled",
                                                wait=False))
        self.loop.add(req, lambda out: R.update(room, first=out,
                                                prefill_done_at=time.monotonic()))
        try:
            self._await_transfer(room, context)
        finally:
            _record_spans(room)
        return pb.PrefillResponse(room=request.room, timings=_timings(room), cached_tokens=0)

    def _await_transfer(self, room: R.Room, context) -> None:
        """Wait for the decode worker's Transfer (bootstrap timeout), then for the write."""
        left = self.bootstrap_timeout - (time.monotonic() - room.arrival)
        if not R.wait_for(room, lambda r: r.transfer is not None, left):
            if room.state == R.PENDING:
                self.host.metrics.bootstrap_timeouts.inc()
            self._drop(room, "DEADLINE_EXCEEDED",
                       f"no Transfer from the decode worker for room {room.room} within the "
                       f"bootstrap timeout ({self.bootstrap_timeout:g}s); its KV was freed")
            _abort_with(context, room)
        R.wait_for(room, lambda r: r.state == R.DONE, None)
        if room.state != R.DONE:
            _abort_with(context, room)

    def Transfer(self, request: pb.TransferRequest, context) -> pb.TransferResponse:
        """Write the room's prompt KV into the decode worker's pages; answer with token 1."""
        try:
            self._check_layout(request)
        except ValueError as e:
            code = "INVALID_ARGUMENT" if "must be" in str(e) else "FAILED_PRECONDITION"
            if (room := self.rooms.get(request.room)) is not None:
                self._drop(room, code, str(e))
            context.abort(getattr(grpc.StatusCode, code), str(e))
        room = self.rooms.get_or_create(request.room)
        if room is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"room {request.room} is unknown here (aborted or finished)")
        if room.transfer is not None:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"room {request.room} already has a Transfer")
        R.update(room, transfer=request, transfer_at=time.monotonic())
        context.add_callback(lambda: self._drop(
            room, "CANCELLED", "Transfer was cancelled by the decode worker", wait=False))
        remaining = context.time_remaining()
        if remaining is None:  # no deadline from the caller: the bootstrap timeout bounds it
            remaining = self.bootstrap_timeout
        if not R.wait_for(room, lambda r: r.first is not None, remaining):
            if room.state != R.FAILED:
                self._drop(room, "DEADLINE_EXCEEDED",
                           f"room {room.room}: KV not ready before the Transfer deadline")
            _abort_with(context, room)
        return self._write(room, request, context)

    def Abort(self, request: pb.PrefillAbortRequest, context) -> pb.PrefillAbortResponse:
        """Drop the room wherever it is; when this returns, no write of it is in flight."""
        room = self.rooms.get(request.room)
        if room is None:
            self.rooms.remove(request.room)  # a late Prefill/Transfer for it fails at once
            return pb.PrefillAbortResponse(aborted=False)
        return pb.PrefillAbortResponse(aborted=self._drop(room, "CANCELLED",
                                                          f"room {request.room} was aborted"))

    def Stats(self, request: pb.PrefillStatsRequest, context) -> pb.PrefillStatsResponse:
        """Pages, live rooms, and the rooms transferred / failed since start."""
        s = self.snapshot()
        return pb.PrefillStatsResponse(total_pages=s["num_pages"], free_pages=s["free_pages"],
                                       rooms=s["rooms"], transferred_requests=s["finished"],
                                       failed_requests=s["failed"])

    # -- internals -----------------------------------------------------------------------
    def _count(self, ok: bool) -> None:
        with self._counts_lock:
            if ok:
                self.transferred += 1
            else:
                self.failed += 1

    def _check_layout(self, request: pb.TransferRequest) -> None:
        pages = list(request.dst_page_ids)
        dst = KVLayout(model=request.model_id, dtype=request.dtype,
                       page_size=request.page_size, num_layers=request.num_layers,
                       num_kv_heads=request.num_kv_heads, head_dim=request.head_dim,
                       bytes_per_page=request.bytes_per_page,
                       num_pages=max(pages, default=0) + 1)
        check_compatible(self.host.layout, dst, pages)

    def _write(self, room: R.Room, request: pb.TransferRequest, context) -> pb.TransferResponse:
        with room.changed:
            if room.state != R.PENDING:
                _abort_with(context, room)
            room.state = R.WRITING  # from here on only this thread touches the pages
        first, err, stats = room.first, None, None
        if len(request.dst_page_ids) != len(first.pages):
            err = R.RoomError("INVALID_ARGUMENT", f"room {room.room} has {len(first.pages)} "
                              f"prompt pages, got {len(request.dst_page_ids)} destination pages")
        else:
            stats, err = self._write_pages(room, request, first.pages)
        self._finish_write(room, err, stats)
        if room.state != R.DONE:
            _abort_with(context, room)
        lp = first.logprobs[0] if first.logprobs else None
        return pb.TransferResponse(
            first_token_id=first.token_ids[0],
            first_logprob=logprob_to_proto(lp) if lp is not None else None, cached_tokens=0,
            bytes_moved=stats.bytes, descriptor_count=stats.descriptors,
            transfer_s=stats.seconds)

    def _write_pages(self, room: R.Room, request: pb.TransferRequest, pages: list[int]):
        """The KV write itself, as span `kv.transfer` and in the transfer metrics;
        returns (TransferStats, None) or (None, RoomError)."""
        m = self.host.metrics
        with tracing.span("kv.transfer", **{"pdmesh.room": str(room.room),
                                            "pdmesh.kv.pages": len(pages),
                                            "pdmesh.kv.destination": request.dst_session_id}) as sp:
            try:
                stats = self.host.transport.write_pages(
                    request.dst_session_id, self.host.kv_base, request.dst_kv_base_address,
                    self.host.layout.bytes_per_page, pages, list(request.dst_page_ids))
            except Exception as e:  # TransferError, or a bad destination
                m.transfer_failures.inc()
                sp.set_attribute("pdmesh.kv.error", str(e))
                return None, R.RoomError("INTERNAL", f"KV transfer of room {room.room} to "
                                         f"{request.dst_session_id} failed: {e}")
            sp.set_attributes({"pdmesh.kv.bytes": stats.bytes,
                               "pdmesh.kv.descriptors": stats.descriptors,
                               "pdmesh.kv.gb_per_s": stats.bytes / max(stats.seconds, 1e-9) / 1e9})
        m.transfer_bytes.inc(stats.bytes)
        m.transfer_pages.inc(len(pages))
        m.transfer_seconds.observe(stats.seconds)
        return stats, None

    def _finish_write(self, room: R.Room, err: R.RoomError | None, stats) -> None:
        """Leave WRITING: DONE (pages released) or FAILED (pages aborted); wake everyone."""
        with room.changed:
            room.error = room.error or err
            room.state = R.FAILED if room.error else R.DONE
            room.result = stats
            room.changed.notify_all()
        rid = str(room.room)
        (self.loop.release(rid) if room.state == R.DONE else self.loop.abort(rid))
        self._count(room.state == R.DONE)
        self.rooms.remove(room.room)
        room.write_done.set()

    def _drop(self, room: R.Room, code: str, message: str, wait: bool = True) -> bool:
        """Fail the room and free its KV. A room being written is freed by the writer
        (after the write); with `wait`, block until then. True when the room was live."""
        before = R.fail(room, code, message)
        if before == R.PENDING:
            self.loop.abort(str(room.room))
            self.rooms.remove(room.room)
            self._count(False)
        elif before == R.WRITING and wait:
            room.write_done.wait(60)
        return before in (R.PENDING, R.WRITING)

    def peer_gone(self, event: str, address: str) -> None:
        """Registry watch: a decode worker expired or left; free every room bound for it."""
        for room in self.rooms.bound_for(address):
            self._drop(room, "UNAVAILABLE", f"decode worker {address} {event.lower()}; "
                       f"room {room.room} dropped", wait=False)

    def snapshot(self) -> dict[str, int]:
        """Pages, queues, rooms and cumulative counters (read on the engine loop)."""
        def read() -> dict[str, int]:
            s, a = self.engine.scheduler, self.engine.allocator
            queued_tokens = sum(r.prompt_len for r in s.waiting) + sum(
                r.prompt_len - r.num_computed for r in s.prefilling)
            return {"running": len(s.prefilling) + len(s.held), "queued": len(s.waiting),
                    "queued_prefill_tokens": queued_tokens, "num_pages": a.num_pages,
                    "free_pages": a.num_free, "used_pages": a.num_used,
                    "page_size": self.engine.config.page_size,
                    "prompt_tokens": self.loop.prompt_tokens,
                    "generation_tokens": self.loop.generation_tokens}
        snap = self.host.read_engine("snapshot", read)
        with self._counts_lock:
            snap.update(finished=self.transferred, failed=self.failed)
        return {**snap, "rooms": len(self.rooms.all())}

    def load(self) -> rpb.LoadReport:
        """Heartbeat load: running, queued, free pages, queued prefill tokens."""
        s = self.snapshot()
        return rpb.LoadReport(running=s["running"], queued=s["queued"],
                              free_kv_pages=s["free_pages"],
                              queued_prefill_tokens=s["queued_prefill_tokens"])


def _abort_with(context, room: R.Room) -> None:
    err = room.error or R.RoomError("INTERNAL", f"room {room.room} failed")
    context.abort(getattr(grpc.StatusCode, err.code), err.message)


def _record_spans(room: R.Room) -> None:
    """prefill.queue, prefill.compute and prefill.wait_transfer as children of the
    Prefill RPC's span, from the stamps the engine loop left (no-op when tracing is off)."""
    req = room.req
    if not tracing.enabled() or req is None or req.scheduled_time is None:
        return
    attrs = {"pdmesh.room": str(room.room)}
    tracing.record_span("prefill.queue", req.arrival_time, req.scheduled_time, attrs)
    if room.prefill_done_at is None:
        return
    tracing.record_span("prefill.compute", req.scheduled_time, room.prefill_done_at,
                        {**attrs, "pdmesh.prompt_tokens": req.prompt_len})
    if room.transfer_at is not None:
        tracing.record_span("prefill.wait_transfer", room.prefill_done_at,
                            max(room.transfer_at, room.prefill_done_at), attrs)


def _timings(room: R.Room) -> pb.PrefillTimings:
    req, stats = room.req, room.result
    start = req.scheduled_time or room.arrival
    done = room.prefill_done_at or start
    return pb.PrefillTimings(queue_s=max(0.0, start - req.arrival_time),
                             prefill_s=max(0.0, done - start),
                             wait_transfer_s=max(0.0, (room.transfer_at or done) - done),
                             transfer_s=stats.seconds if stats else 0.0)


def create_server(addr: str, host: WorkerHost, interceptors=()
                  ) -> tuple[grpc.Server, int, PrefillServicer, object]:
    """Serve Prefill (+ health, reflection) on `addr`; returns (server, port, servicer, health)."""
    servicer = PrefillServicer(host)
    server, port, health = _create_grpc_server(
        addr, [Servicer(servicer, pb_grpc.add_PrefillServicer_to_server, SERVICE_NAME)],
        interceptors=interceptors)
    return server, port, servicer, health
