"""`pdmesh.v1.Prefill` on grpc.aio: a thin adapter between protos and PrefillProtocol.

Each RPC validates its message, calls the protocol (pdmesh/disagg/prefill.py: rooms,
the bootstrap timeout, the write, aborts) and maps a RoomError to its status code.
No thread is held by a waiting call: a Prefill waiting for its decode's Transfer is a
suspended coroutine, so the number of open rooms is bounded by the engine alone.
"""
from __future__ import annotations

import logging

import grpc

from pdmesh.disagg.ports import RoomError, TransferTarget
from pdmesh.disagg.prefill import PrefillProtocol
from pdmesh.grpc_util import BLAME_TRAILER, Servicer, create_aio_server, service_name
from pdmesh.runtime.request import Mode
from pdmesh.services.common.kv import CorruptKV, TransportWriter
from pdmesh.services.common.worker import WorkerHost
from pdmesh.services.prefill.timings import record_spans, timings
from pdmesh.transfer import KVLayout, check_compatible
from pdmesh.transfer.sharded import kv_rank_from_proto
from pdmesh.v1 import prefill_pb2 as pb
from pdmesh.v1 import prefill_pb2_grpc as pb_grpc
from pdmesh.v1 import registry_pb2 as rpb
from pdmesh.worker.convert import logprob_to_proto, sampling_from_proto, validate_token_ids

log = logging.getLogger(__name__)
SERVICE_NAME = service_name(pb, "Prefill")
# Share of the pool that rooms may fill before their decode has pages for them
# (pdmesh/disagg/prefill.py, "compute-ahead budget").
AHEAD_FRACTION = 0.5


class PrefillServicer(pb_grpc.PrefillServicer):
    """The Prefill RPCs over one WorkerHost (async engine + transport)."""

    def __init__(self, host: WorkerHost) -> None:
        self.host = host
        cfg = host.config
        self.writer = TransportWriter(host.router() if host.has_kv else None, host.metrics,
                                      checksum=cfg.kv_checksum, chaos=_chaos(cfg),
                                      faults=host.chaos)
        self.proto = PrefillProtocol(host.engine, self.writer, cfg.bootstrap_timeout,
                                     self._check_target, mode=Mode.PREFILL_ONLY,
                                     on_bootstrap_timeout=host.metrics.bootstrap_timeouts.inc,
                                     page_size=host.layout.page_size,
                                     ahead_pages=int(host.layout.num_pages * AHEAD_FRACTION),
                                     on_integrity=self._integrity,
                                     shed_queued=cfg.shed_queued)
        if host.engine is not None:  # rooms fail with the engine (the worker stops too)
            host.engine.add_failure_listener(self.proto.engine_failed)

    # -- RPCs ----------------------------------------------------------------------------
    async def Prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillResponse:
        """Queue the prompt at once; return when its KV is in the decode worker (or failed)."""
        try:
            ids = validate_token_ids(request.token_ids, self.host.model_config.vocab_size)
            params = sampling_from_proto(request.sampling_params)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            room = await self.proto.prefill(request.room, request.decode_address, ids, params)
        except RoomError as e:
            await _abort(context, e)
        record_spans(room)
        return pb.PrefillResponse(room=request.room, timings=timings(room),
                                  cached_tokens=getattr(room.first, "cached_tokens", 0))

    async def Transfer(self, request: pb.TransferRequest, context) -> pb.TransferResponse:
        """Write the room's prompt KV into the decode worker's pages; answer with token 1."""
        target = _target(request)
        try:
            reply = await self.proto.transfer(request.room, target, context.time_remaining())
        except RoomError as e:
            await _abort(context, e)
        lp = reply.first_logprob
        return pb.TransferResponse(
            first_token_id=reply.first_token,
            first_logprob=logprob_to_proto(lp) if lp is not None else None,
            cached_tokens=reply.cached_tokens,
            bytes_moved=reply.bytes_moved, descriptor_count=reply.descriptors,
            transfer_s=reply.seconds, transfer_path=reply.path,
            kv_checksum=reply.checksum.value if reply.checksum else 0,
            kv_checksum_algo=reply.checksum.algo if reply.checksum else "")

    async def Abort(self, request: pb.PrefillAbortRequest, context) -> pb.PrefillAbortResponse:
        """Drop the room wherever it is; when this returns, no write of it is in flight."""
        return pb.PrefillAbortResponse(aborted=await self.proto.abort(request.room))

    async def Stats(self, request: pb.PrefillStatsRequest, context) -> pb.PrefillStatsResponse:
        """Pages, live rooms, and the rooms transferred / failed since start."""
        s = self.snapshot()
        return pb.PrefillStatsResponse(total_pages=s["num_pages"], free_pages=s["free_pages"],
                                       rooms=s["rooms"], transferred_requests=s["finished"],
                                       failed_requests=s["failed"])

    # -- plumbing ------------------------------------------------------------------------
    def _integrity(self, kind: str) -> None:
        """A destination checksum mismatch: "retry" (rewritten) or "failure" (room failed)."""
        if kind == "retry":
            self.host.metrics.integrity_retries.inc()
        else:
            self.host.metrics.integrity_failures.labels("prefill").inc()

    def _check_target(self, target: TransferTarget) -> None:
        check_compatible(self.host.layout, target.layout, list(target.page_ids))

    def snapshot(self) -> dict[str, int]:
        """Pages, queues, rooms and cumulative counters (never waits on a step)."""
        s, c = self.host.engine.stats, self.proto.counters
        return {"running": s.running + s.held, "queued": s.waiting,
                "queued_prefill_tokens": s.queued_prefill_tokens, "num_pages": s.num_pages,
                "free_pages": s.free_pages, "used_pages": s.used_pages,
                "page_size": s.page_size, "prompt_tokens": s.prompt_tokens,
                "generation_tokens": s.generation_tokens, "finished": c.transferred,
                "failed": c.failed, "rooms": len(self.proto.rooms),
                "reserved_pages": s.reserved_pages, "retracted": s.retracted,
                "estimated_pages": s.estimated_pages,
                "kv_writes_queued": self.writer.queued,
                "ahead_pages": self.proto.ahead_pages, "deferred_rooms": self.proto.deferred_rooms,
                "deferred_total": c.deferred, "prefill_steps": s.prefill_steps,
                "decode_steps": s.decode_steps}

    def load(self) -> rpb.LoadReport:
        """Heartbeat load: running, queued, free pages, queued prefill tokens."""
        s = self.snapshot()
        return rpb.LoadReport(running=s["running"], queued=s["queued"],
                              free_kv_pages=s["free_pages"],
                              queued_prefill_tokens=s["queued_prefill_tokens"])

    def peer_gone(self, event: str, address: str) -> None:
        """Registry watch: a decode worker expired or left; free every room bound for it."""
        self.proto.peer_gone(address, event)

    async def close(self) -> None:
        self.writer.close()


def _chaos(cfg) -> CorruptKV | None:
    """The KV-corruption chaos hook when PDMESH_CHAOS_CORRUPT_KV is set (tests only)."""
    if cfg.chaos_corrupt_kv <= 0:
        return None
    log.warning("chaos: corrupting KV writes (first write of a room with probability %g%s)"
                " -- a test hook, never for serving", cfg.chaos_corrupt_kv,
                ", rewrites too" if cfg.chaos_corrupt_kv_rewrites else "")
    return CorruptKV(cfg.chaos_corrupt_kv, cfg.chaos_corrupt_kv_rewrites)


def _target(request: pb.TransferRequest) -> TransferTarget:
    pages = tuple(request.dst_page_ids)
    layout = KVLayout(model=request.model_id, dtype=request.dtype, page_size=request.page_size,
                      num_layers=request.num_layers, num_kv_heads=request.num_kv_heads,
                      head_dim=request.head_dim, bytes_per_page=request.bytes_per_page,
                      num_pages=max(pages, default=0) + 1,
                      ranks=tuple(kv_rank_from_proto(r) for r in request.dst_ranks))
    return TransferTarget(session_id=request.dst_session_id,
                          kv_base=request.dst_kv_base_address, page_ids=pages, layout=layout,
                          decode_worker_id=request.decode_worker_id, room=request.room,
                          host_id=request.dst_host_id,
                          local_endpoints=tuple(request.dst_local_endpoints),
                          cached_pages=request.dst_cached_pages)


async def _abort(context, e: RoomError) -> None:
    blame = ((BLAME_TRAILER, e.blame),) if e.blame else ()
    await context.abort(grpc.StatusCode[e.code.name], e.message, blame)


async def create_server(addr: str, host: WorkerHost, interceptors=()):
    """Serve Prefill (+ health, reflection) on `addr`; returns (server, port, servicer, health)."""
    servicer = PrefillServicer(host)
    chaos = [host.chaos.servicer()] if host.chaos is not None else []  # --chaos
    server, port, health = await create_aio_server(
        addr, [Servicer(servicer, pb_grpc.add_PrefillServicer_to_server, SERVICE_NAME), *chaos],
        interceptors=interceptors)
    return server, port, servicer, health
