"""One attempt's two worker calls, relayed as the decode's chunk stream.

    Decode.Generate(room, P, tokens, sampling)   server stream   } sent concurrently
    Prefill.Prefill(room, D, tokens, sampling)   unary           }

Both calls carry what is left of the client's deadline as their gRPC deadline. A failed
prefill cancels the decode stream at once (it would otherwise wait for the KV until the
waiting timeout) and its error is the one reported (failures.pair_failure). Closing the
stream early (client gone, stop string) cancels both calls, which both workers see as
cancellation and free the room's pages. Channels and stubs are made once per worker.
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import grpc

from pdmesh import auth
from pdmesh.telemetry import tracing
from pdmesh.v1 import common_pb2 as cpb
from pdmesh.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from pdmesh.services.gateway.failures import pair_failure
from pdmesh.services.gateway.observe import RequestObserver
from pdmesh.services.gateway.pool import Route

# After a successful decode stream the Prefill response is normally already in; wait
# this long for it (for cached_tokens) before giving up on it.
_PREFILL_TAIL_S = 2.0


class Legs:
    """The gateway's calls to its workers: one channel per address, one stub per
    (worker, service), and the two legs of a routed pair."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, type], object] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = auth.aio_insecure_channel(  # + the cluster token
                address, interceptors=tracing.aio_client_interceptors())
        return self._channels[address]

    def _stub(self, address: str, cls):
        """One stub per (worker, service): making one per request costs more than the call."""
        stub = self._stubs.get((address, cls))
        if stub is None:
            stub = self._stubs[(address, cls)] = cls(self._channel(address))
        return stub

    async def connect(self, addresses: list[str], timeout: float) -> int:
        """Open the channels to these workers now, not on their first request; how many
        became ready within `timeout` (a worker that did not is connected on first use)."""
        async def one(address: str) -> bool:
            try:
                await asyncio.wait_for(self._channel(address).channel_ready(), timeout)
                return True
            except (asyncio.TimeoutError, grpc.RpcError):
                return False
        return sum(await asyncio.gather(*(one(a) for a in addresses)))

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        self._stubs.clear()

    def calls(self, route: Route, room: int, prompt_ids: list[int],
              sampling: cpb.SamplingParams, deadline: float | None = None):
        """Start both legs: (decode stream call, prefill call or None), each with what is
        left of `deadline` as its gRPC deadline."""
        d, p = route.decode, route.prefill
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        dcall = self._stub(d.address, decode_pb2_grpc.DecodeStub).Generate(
            decode_pb2.DecodeRequest(
                room=room, prefill_worker_id=p.worker_id if p else "",
                prefill_address=p.address if p else "", token_ids=prompt_ids,
                sampling_params=sampling), timeout=timeout)
        pcall = None
        if p is not None:
            pcall = self._stub(p.address, prefill_pb2_grpc.PrefillStub).Prefill(
                prefill_pb2.PrefillRequest(room=room, decode_worker_id=d.worker_id,
                                           decode_address=d.address, token_ids=prompt_ids,
                                           sampling_params=sampling), timeout=timeout)
        return dcall, pcall

    async def stream(self, route: Route, room: int, prompt_ids: list[int],
                     sampling: cpb.SamplingParams, obs: RequestObserver | None = None,
                     deadline: float | None = None
                     ) -> AsyncIterator[decode_pb2.DecodeChunk]:
        """Run both legs of `route`; yields the decode's chunks. Raises LegFailed."""
        d, p = route.decode, route.prefill
        # the calls' client spans (and traceparent) hang under the request's span
        with tracing.attached(obs.context if obs is not None else None):
            dcall, pcall = self.calls(route, room, prompt_ids, sampling, deadline)
            ptask = asyncio.ensure_future(pcall) if pcall is not None else None
        if ptask is not None:
            _watch_prefill(ptask, dcall, route, obs)
        try:
            async for chunk in dcall:
                if obs is not None and chunk.HasField("timings"):
                    obs.decode_first(chunk.timings)
                yield chunk
            if ptask is not None:
                await asyncio.wait([ptask], timeout=_PREFILL_TAIL_S)
        except grpc.aio.AioRpcError as e:
            raise pair_failure(ptask, p, d, e) from None
        except asyncio.CancelledError:
            if ptask is not None and ptask.done() and not ptask.cancelled() and ptask.exception():
                raise pair_failure(ptask, p, d, None) from None
            raise  # our own cancellation (client gone)
        finally:
            dcall.cancel()
            if pcall is not None and not pcall.done():
                pcall.cancel()


def _watch_prefill(ptask: asyncio.Future, dcall, route: Route,
                   obs: RequestObserver | None) -> None:
    """What the prefill leg's answer sets off: its timings to `obs` and to pd_mode's
    model (route.ticket); its failure cancels the decode stream at once."""
    def ok(t: asyncio.Future) -> bool:
        return not t.cancelled() and not t.exception()
    if obs is not None:
        ptask.add_done_callback(lambda t: obs.prefill_done(t.result().timings)
                                if ok(t) else None)
    # a failed prefill ends the decode stream at once (it would otherwise wait for the
    # KV until the waiting timeout)
    ptask.add_done_callback(
        lambda t: dcall.cancel() if not t.cancelled() and t.exception() else None)
    if route.ticket is not None:  # the prefill's timings calibrate pd_mode's model
        ptask.add_done_callback(lambda t: route.ticket.prefill_done(t.result())
                                if ok(t) else None)
