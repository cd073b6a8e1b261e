"""One step of a request's output as the gateway hands it on (gRPC messages, SSE)."""
from __future__ import annotations

from dataclasses import dataclass, field

from pdmesh.v1 import common_pb2 as cpb


@dataclass
class Delta:
    """One step of a request's output (may carry several tokens)."""

    room: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[cpb.TokenLogprob] = field(default_factory=list)
    finish_reason: int = cpb.FINISH_REASON_UNSPECIFIED
    usage: cpb.Usage | None = None  # on a choice's last Delta: that choice's
    index: int = 0  # which choice (n > 1: choices.py)
