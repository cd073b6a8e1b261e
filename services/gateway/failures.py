"""What a request's failure is at the gateway: its status, and which leg to blame.

`GatewayError` carries the gRPC status a failed request maps to (REST maps that to an
HTTP status; errors.py decides what the client is told). `LegFailed` is a worker call's
failure: which leg, which worker, the code the worker answered and the code the client
gets (RESOURCE_EXHAUSTED stays 429 with retry-after, INVALID_ARGUMENT stays the
client's, everything else is the mesh's: UNAVAILABLE). When both legs fail the
prefill's error is reported: the decode's is then a consequence; a worker's error whose
`pdmesh-blame` trailer names the other leg (its room failed because that worker died or
left) blames that leg, whichever error reached the gateway first. A passed client
deadline is DEADLINE_EXCEEDED, never a worker's fault.
"""
from __future__ import annotations

import asyncio
import time

import grpc

from pdmesh.grpc_util import BLAME_TRAILER

DEADLINE_PASSED = "The request's deadline passed before it completed."


class GatewayError(Exception):
    """A request failure with the gRPC status it maps to (REST maps that to HTTP)."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        # trailers: gRPC trailing metadata (REST: response headers), e.g. retry-after
        self.code, self.message, self.trailers = code, message, trailers


class LegFailed(GatewayError):
    """A leg's failure: which leg, which worker, and the code the worker answered
    (`worker_code`; `code` is what the client gets)."""

    def __init__(self, leg: str, worker, worker_code: grpc.StatusCode, message: str) -> None:
        code, trailers = worker_code, ()
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # the worker sheds load: 429
            trailers = (("retry-after", "1"), ("retry-after-ms", "1000"))
        elif code != grpc.StatusCode.INVALID_ARGUMENT:
            code = grpc.StatusCode.UNAVAILABLE  # the mesh failed, not the request
        super().__init__(code, message, trailers)
        self.leg, self.worker, self.worker_code = leg, worker, worker_code


def leg_error(leg: str, worker, e: grpc.aio.AioRpcError) -> LegFailed:
    return LegFailed(leg, worker, e.code(),
                     f"{leg} worker {worker.address} failed: {e.code().name}: {e.details()}")


def pair_failure(ptask: asyncio.Future | None, prefill, decode,
                 e: grpc.aio.AioRpcError | None) -> LegFailed:
    """The pair's failure: the prefill's error when it failed (the decode's is then a
    consequence), else the decode's `e` (None: the decode stream was cut off)."""
    if ptask is not None and ptask.done() and not ptask.cancelled():
        pe = ptask.exception()
        if isinstance(pe, grpc.aio.AioRpcError):
            if _blamed(pe) == "decode":  # the prefill's room failed because its decode left
                return leg_error("decode", decode, pe)
            return leg_error("prefill", prefill, pe)
    if e is None:
        return LegFailed("decode", decode, grpc.StatusCode.UNAVAILABLE,
                         f"decode worker {decode.address} failed")
    if prefill is not None and _blamed(e) == "prefill":  # the decode saw the prefill fail
        return leg_error("prefill", prefill, e)
    return leg_error("decode", decode, e)


def _blamed(e: grpc.aio.AioRpcError) -> str:
    """The leg a worker's error says failed its room ("" when it says none)."""
    return next((v for k, v in e.trailing_metadata() or () if k == BLAME_TRAILER), "")


def deadline_error() -> GatewayError:
    """The client's deadline passed: its own, not the workers' fault."""
    return GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE_PASSED)


def check_deadline(deadline: float | None) -> None:
    """DEADLINE_EXCEEDED once `deadline` (time.monotonic()) has passed."""
    if deadline is not None and time.monotonic() >= deadline:
        raise deadline_error()
