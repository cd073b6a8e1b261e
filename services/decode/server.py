"""`pdmesh.v1.Decode` on grpc.aio: a thin adapter between protos and DecodeProtocol.

Generate streams what the protocol yields (pdmesh/disagg/decode.py: admission, the
prefill's Transfer, adopt, quarantine, peer-gone); a message may carry several tokens
when the client reads slower than the engine decodes. A cancelled call closes the
protocol's iterator, which frees (or quarantines) the room's pages.
"""
from __future__ import annotations

import logging
import math

import grpc

from pdmesh.disagg.decode import DecodeProtocol
from pdmesh.disagg.ports import RoomError, TransferTarget
from pdmesh.grpc_util import BLAME_TRAILER, Servicer, create_aio_server, service_name
from pdmesh.runtime.request import Mode
from pdmesh.services.common.worker import WorkerHost
from pdmesh.services.decode.chunks import first_chunk_timings, make_chunks
from pdmesh.services.decode.peers import GrpcPrefillPeers
from pdmesh.telemetry import tracing
from pdmesh.v1 import decode_pb2 as pb
from pdmesh.v1 import decode_pb2_grpc as pb_grpc
from pdmesh.v1 import registry_pb2 as rpb
from pdmesh.worker.convert import sampling_from_proto, validate_token_ids

log = logging.getLogger(__name__)
SERVICE_NAME = service_name(pb, "Decode")
MAX_FORWARD_SLEEP_S = 60.0


class DecodeServicer(pb_grpc.DecodeServicer):
    """The Decode RPCs over one WorkerHost. PD rooms need the host's transport."""

    def __init__(self, host: WorkerHost) -> None:
        self.host = host
        pd = host.has_kv
        self.peers = GrpcPrefillPeers(host.kv_engine.endpoint) if pd else None
        # the pool is read (off the event loop) for the KV checksum before adopt
        kv = host.kv_receiver(checksum=host.config.kv_checksum != "off") if pd else None
        self.proto = DecodeProtocol(
            host.engine, self.peers, kv, self._target, host.config.waiting_timeout,
            liveness=host, modes=(Mode.ADOPTED, Mode.GENERATE),
            stream_interval=host.config.stream_interval,
            on_integrity_failure=host.metrics.integrity_failures.labels("decode").inc,
            shed_queued=host.config.shed_queued)

    # -- RPCs ----------------------------------------------------------------------------
    async def Generate(self, request: pb.DecodeRequest, context):
        """Stream the room's tokens: KV from the prefill (or computed here when colocated)."""
        try:
            ids = validate_token_ids(request.token_ids, self.host.model_config.vocab_size)
            params = sampling_from_proto(request.sampling_params)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if request.prefill_address and self.peers is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker is colocated "
                                "(no KV transfer); send an empty prefill_address")
        first, waits = True, self.proto.counters.waiting_timeouts
        steps = self.proto.generate(request.room, request.prefill_address, ids, params)
        try:
            async for outs, room in steps:
                # prompt tokens from a prefix cache: PD, the longer of the prefill's prefix
                # (not computed) and this worker's (not sent): both prefixes of the prompt,
                # so each token counts once; colocated, this engine's
                cached = (max(room.reply.cached_tokens,
                              room.cached_pages * self.host.layout.page_size)
                          if room.reply else None)
                for chunk in make_chunks(outs, len(ids), cached, self.host.tokenizer):
                    if first and room.stamps:
                        first_chunk_timings(chunk, room.request_id, room.stamps)
                        self._admitted(room)
                    first = False
                    yield chunk
        except RoomError as e:
            if self.proto.counters.waiting_timeouts > waits:
                self.host.metrics.waiting_timeouts.inc()
            blame = ((BLAME_TRAILER, e.blame),) if e.blame else ()
            await context.abort(grpc.StatusCode[e.code.name], e.message, blame)
        finally:
            await steps.aclose()

    async def Abort(self, request: pb.DecodeAbortRequest, context) -> pb.DecodeAbortResponse:
        """End the room's stream (CANCELLED) and free its pages (quarantined if needed)."""
        return pb.DecodeAbortResponse(aborted=self.proto.abort(request.room))

    async def SlowDown(self, request: pb.SlowDownRequest, context) -> pb.SlowDownResponse:
        """Sleep this long after every forward (decode-capacity measurement); 0 = none."""
        t = request.forward_sleep_time
        if not (math.isfinite(t) and 0 <= t <= MAX_FORWARD_SLEEP_S):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"forward_sleep_time must be "
                                f"in [0, {MAX_FORWARD_SLEEP_S:g}] seconds, got {t}")
        await self.host.engine.slow_down(t)
        return pb.SlowDownResponse(forward_sleep_time=t)

    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        """Pages (free + used + quarantined = total), running, queued, SlowDown sleep."""
        s = self.snapshot()
        return pb.StatsResponse(
            total_pages=s["num_pages"], free_pages=s["free_pages"], used_pages=s["used_pages"],
            quarantined_pages=s["quarantined_pages"], running=s["running"], queued=s["queued"],
            forward_sleep_time=s["forward_sleep_time"], finished_requests=s["finished"])

    # -- plumbing ------------------------------------------------------------------------
    def _admitted(self, room) -> None:
        """The wait for pages: a `decode.admission` span and the admission-wait metric."""
        t0, t_pages = room.stamps["arrival"], room.stamps["pages"]
        tracing.record_span("decode.admission", t0, t_pages,
                            {"pdmesh.room": room.request_id,
                             "pdmesh.kv.pages": len(room.pages or []),
                             "pdmesh.kv.cached_pages": room.cached_pages})
        self.host.metrics.admission_wait.observe(t_pages - t0)

    def snapshot(self) -> dict[str, float]:
        """Pages, running and queued requests, token and request counters (never waits)."""
        s, q = self.host.engine.stats, self.proto.quarantine
        return {"num_pages": s.num_pages, "free_pages": s.free_pages,
                "used_pages": s.used_pages - q.pages, "quarantined_pages": q.pages,
                "running": s.running - s.held,
                "queued": s.held - len(q) + s.prealloc_queue + s.waiting,
                "reserved_pages": s.reserved_pages, "retracted": s.retracted,
                "estimated_pages": s.estimated_pages,
                "prealloc_queue": s.prealloc_queue,
                "page_size": s.page_size, "finished": self.proto.counters.finished,
                "prompt_tokens": s.prompt_tokens, "generation_tokens": s.generation_tokens,
                "forward_sleep_time": s.forward_sleep_time,
                "prefill_steps": s.prefill_steps, "decode_steps": s.decode_steps}

    def _target(self, pages: list[int]) -> TransferTarget:
        host = self.host
        return TransferTarget(session_id=host.session_id, kv_base=host.kv_base,
                              page_ids=tuple(pages), layout=host.layout,
                              decode_worker_id=host.registry.worker_id if host.registry else "",
                              host_id=host.host_id, local_endpoints=tuple(host.local_endpoints))

    def load(self) -> rpb.LoadReport:
        """Heartbeat load: running, queued, free (not held, not quarantined) pages."""
        s = self.snapshot()
        return rpb.LoadReport(running=int(s["running"]), queued=int(s["queued"]),
                              free_kv_pages=int(s["free_pages"]))

    def peer_gone(self, event: str, address: str) -> None:
        """Registry watch: a prefill expired or left."""
        self.proto.peer_gone(address, event)

    async def close(self) -> None:
        self.proto.quarantine.close()
        if self.peers is not None:
            await self.peers.close()


async def create_server(addr: str, host: WorkerHost, interceptors=()):
    """Serve Decode (+ health, reflection) on `addr`; returns (server, port, servicer, health)."""
    servicer = DecodeServicer(host)
    chaos = [host.chaos.servicer()] if host.chaos is not None else []  # --chaos
    server, port, health = await create_aio_server(
        addr, [Servicer(servicer, pb_grpc.add_DecodeServicer_to_server, SERVICE_NAME), *chaos],
        interceptors=interceptors)
    return server, port, servicer, health
