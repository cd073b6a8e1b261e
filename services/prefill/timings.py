"""A prefill room's stage timings: the PrefillTimings message and its trace spans."""
from __future__ import annotations

from pdmesh.disagg.prefill import PrefillRoom
from pdmesh.telemetry import tracing
from pdmesh.v1 import prefill_pb2 as pb


def record_spans(room: PrefillRoom) -> None:
    """prefill.queue, prefill.compute and prefill.wait_transfer as children of the
    Prefill RPC's span, from the stamps the engine left (no-op when tracing is off)."""
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


def timings(room: PrefillRoom) -> pb.PrefillTimings:
    """Queue, compute, wait-for-Transfer and write seconds of a finished room."""
    req, stats = room.req, room.stats
    start = req.scheduled_time or room.arrival
    done = room.prefill_done_at or start
    return pb.PrefillTimings(queue_s=max(0.0, start - req.arrival_time),
                             prefill_s=max(0.0, done - start),
                             wait_transfer_s=max(0.0, (room.transfer_at or done) - done),
                             # the whole write step (the pair's path is bound on its
                             # first write, then the integrity check), not the bytes alone
                             transfer_s=room.write_s if room.write_s is not None else
                             stats.seconds if stats else 0.0)
