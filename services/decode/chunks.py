"""Decode stream messages: engine outputs -> DecodeChunk (tokens, logprobs, the end),
and the decode side's TTFT timings on a PD room's first chunk."""
from __future__ import annotations

import time

from pdmesh.telemetry import tracing
from pdmesh.v1 import common_pb2 as cpb
from pdmesh.v1 import decode_pb2 as pb
from pdmesh.worker.convert import finish_reason_to_proto, logprob_to_proto


def make_chunks(outs, prompt_len: int, cached: int | None, tokenizer) -> list[pb.DecodeChunk]:
    """The stream messages of the engine outputs ready now: one per sequence that has
    outputs among them (n > 1: each output's `index`), in the order they came.
    `cached`: the room's cached prompt tokens (PD: the prefill's count), or None for
    each sequence's own (colocated: this engine's prefix cache)."""
    by_index: dict[int, list] = {}
    for o in outs:
        by_index.setdefault(getattr(o, "index", 0), []).append(o)
    return [make_chunk(group, prompt_len, getattr(group[-1], "cached_tokens", 0)
                       if cached is None else cached, tokenizer, i)
            for i, group in by_index.items()]


def make_chunk(outs, prompt_len: int, cached: int, tokenizer, index: int = 0) -> pb.DecodeChunk:
    """One stream message from one sequence's outputs ready now (the last may finish it)."""
    chunk = pb.DecodeChunk(index=index)
    for o in outs:
        chunk.token_ids.extend(o.new_token_ids)
        if o.logprobs:
            chunk.logprobs.extend(logprob_to_proto(lp)
                                  for lp in o.logprobs[-len(o.new_token_ids):])
    last = outs[-1]
    if last.finished:
        chunk.finish_reason = finish_reason_to_proto(last.finish_reason)
        n = len(last.token_ids)
        chunk.usage.CopyFrom(cpb.Usage(prompt_tokens=prompt_len, completion_tokens=n,
                                       total_tokens=prompt_len + n, cached_tokens=cached))
        if isinstance(last.stop_reason, str):
            chunk.stop_reason = last.stop_reason
        elif last.stop_reason is not None:
            chunk.stop_reason = tokenizer.decode([last.stop_reason], False)
    return chunk


def first_chunk_timings(chunk: pb.DecodeChunk, request_id: str, stamps: dict[str, float]) -> None:
    """The decode side of TTFT on the first chunk, and its `decode.first_step` span."""
    now = time.monotonic()
    chunk.timings.CopyFrom(pb.DecodeTimings(
        admission_s=stamps["pages"] - stamps["arrival"], kv_wait_s=stamps["kv"] - stamps["pages"],
        first_step_s=now - stamps["kv"]))
    tracing.record_span("decode.first_step", stamps["kv"], now,
                        {"pdmesh.room": request_id, "pdmesh.tokens": len(chunk.token_ids)})
