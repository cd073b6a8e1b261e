"""The request path (DESIGN.md, "One request"), in asyncio over grpc.aio.

    route (P, D) -> room = random 63-bit id
    Decode.Generate(room, P, tokens, sampling)   server stream   } sent concurrently
    Prefill.Prefill(room, D, tokens, sampling)   unary           }
    merge: decode tokens -> incremental detokenizer (stop strings) -> deltas

If either leg fails the other is cancelled. Before the first token reached the client a
retryable failure (breaker.RETRYABLE) is retried on another pair, with a new room id
(the abandoned room is freed: its calls were cancelled), avoiding the workers that just
failed, after a jittered backoff, up to RetryPolicy.max_attempts in all; the failed
worker's circuit breaker is told. After the first token, or out of attempts, the
request ends with a GatewayError naming the leg and the worker. When the consumer
stops early (client disconnect, stop string matched at the gateway) closing the
generators cancels both calls, which both workers see as cancellation and free the
room's pages.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import grpc

from pdmesh import auth
from pdmesh.runtime.tokenizer import Tokenizer
from pdmesh.telemetry import tracing
from pdmesh.v1 import common_pb2 as cpb
from pdmesh.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from pdmesh.services.gateway.admission import Admission, Rejected
from pdmesh.services.gateway.breaker import ResilienceMetrics, RetryPolicy
from pdmesh.services.gateway.choices import Choices
from pdmesh.services.gateway.observe import RequestObserver
from pdmesh.services.gateway.pool import NoRoute, Route, WorkerPool

log = logging.getLogger(__name__)
# After a successful decode stream the Prefill response is normally already in; wait
# this long for it (for cached_tokens) before giving up on it.
_PREFILL_TAIL_S = 2.0


class GatewayError(Exception):
    """A request failure with the gRPC status it maps to (REST maps that to HTTP)."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        # trailers: gRPC trailing metadata (REST: response headers), e.g. retry-after
        self.code, self.message, self.trailers = code, message, trailers


@dataclass
class ModelInfo:
    """What the gateway needs of the model: its tokenizer and context length (no weights)."""

    name: str
    tokenizer: Tokenizer
    max_model_len: int
    # token ids a prompt may hold are [0, vocab_size) (None: not checked here, the
    # workers still check)
    vocab_size: int | None = None


def load_model_info(model: str, served_name: str | None = None,
                    max_model_len: int | None = None) -> ModelInfo:
    """Tokenizer + context length of `model` ("default", HF folder, .gguf), read from
    its config/metadata only (as `load_model` builds the tokenizer, minus the weights)."""
    from pdmesh.runtime.loader import model_format, read_hf_config, resolve_model_path

    path = resolve_model_path(model)
    if model_format(path) == "gguf":
        from pdmesh.runtime.gguf_loader import gguf_config, open_gguf

        reader = open_gguf(path)
        config = gguf_config(reader, {t.name: t for t in reader.tensors}, Path(path))
    else:
        config = read_hf_config(path)
    tokenizer = Tokenizer.from_path(path, eos_token_ids=config.eos_token_ids)
    return ModelInfo(served_name or model, tokenizer,
                     max_model_len or config.max_position_embeddings, config.vocab_size)


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


def _leg_error(leg: str, worker, e: grpc.aio.AioRpcError) -> LegFailed:
    return LegFailed(leg, worker, e.code(),
                     f"{leg} worker {worker.address} failed: {e.code().name}: {e.details()}")


class Dispatcher:
    """Routes requests through the pool and runs both legs; one per gateway process."""

    def __init__(self, pool: WorkerPool, model: ModelInfo,
                 admission: Admission | None = None, retry: RetryPolicy | None = None,
                 metrics: ResilienceMetrics | None = None) -> None:
        self.pool, self.model = pool, model
        self.admission = admission or Admission()  # default: no limit, only counts
        self.retry = retry or RetryPolicy()
        # the pool's breakers publish circuit states here too (app.py shares one object)
        self.metrics = metrics or pool.breakers.metrics or ResilienceMetrics()
        self.started = int(time.time())  # ListModels' "created"
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

    async def close(self) -> None:
        self.admission.close()
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        self._stubs.clear()

    async def generate(self, prompt_ids: list[int], sampling: cpb.SamplingParams,
                       detokenize: bool = True, obs: RequestObserver | None = None,
                       timeout: float | None = None) -> AsyncIterator[Delta]:
        """Run one request; yields Deltas, the last with finish_reason and usage.
        Raises GatewayError (RESOURCE_EXHAUSTED when admission turns it away, UNAVAILABLE
        when no route or a leg failed, DEADLINE_EXCEEDED when `timeout` seconds passed).
        `obs` (spans, metrics) is told the route, every token message and both legs'
        timings. The request holds an admission slot from before routing until it ends,
        however it ends, retries included. `timeout` (the client's deadline) goes to both
        legs as their gRPC deadline: the workers free the room when it passes, whatever
        happens to the gateway."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # per choice (n > 1): detokenizer, stop strings, token count (choices.py)
        detok = Choices(self.model.tokenizer, prompt_ids, sampling, detokenize)
        try:
            await self.admission.acquire()
        except Rejected as e:
            raise GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED, e.message,
                               e.retry_headers()) from None
        try:  # nothing awaits between acquire and here: the slot cannot leak
            failed: set[str] = set()
            for attempt in range(1, self.retry.max_attempts + 1):
                if attempt > 1:
                    await asyncio.sleep(self.retry.backoff(attempt - 1))
                async with contextlib.aclosing(self._attempt(
                        prompt_ids, sampling, detok, obs, failed,
                        attempt < self.retry.max_attempts, deadline)) as deltas:
                    async for delta in deltas:
                        if delta is None:
                            break  # failed before any token and retryable: next pair
                        yield delta
                    else:
                        return
        finally:
            self.admission.release()

    async def _attempt(self, prompt_ids: list[int], sampling: cpb.SamplingParams,
                       detok: Choices, obs: RequestObserver | None,
                       failed: set[str], may_retry: bool, deadline: float | None = None,
                       ) -> AsyncIterator[Delta | None]:
        """One try on one pair: yields its Deltas, or a single None when it failed before
        its first token in a way another pair may not (the failed worker joins `failed`).
        Past `deadline` (time.monotonic()) it raises DEADLINE_EXCEEDED: the client's
        deadline, not the workers' fault (no breaker failure, no retry)."""
        _check_deadline(deadline)
        try:
            route = self.pool.route(frozenset(failed), prompt_ids)
        except NoRoute as e:
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        room, sent = secrets.randbits(63), False  # a new room per attempt
        try:
            if obs is not None:
                mode = "pd" if route.prefill else "local" if route.ticket else "colocated"
                obs.routed(route, room, mode, route.why)
            async with contextlib.aclosing(self._deltas(route, room, prompt_ids, sampling,
                                                        detok, obs, deadline)) as deltas:
                async for delta in deltas:
                    if not sent:  # the pair delivered: the prefill ran, the KV arrived
                        sent = True
                        self._succeeded(route)
                    yield delta
        except LegFailed as f:
            if deadline is not None and (f.worker_code == grpc.StatusCode.DEADLINE_EXCEEDED
                                         or time.monotonic() >= deadline):
                # the client's deadline, which the legs carried: not the workers' fault
                raise GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   "The request's deadline passed before it completed.") \
                    from None
            if not self.retry.retryable(f.worker_code):
                raise  # the request's own fault: the same on any worker
            if f.worker_code != grpc.StatusCode.RESOURCE_EXHAUSTED:  # busy is not broken
                self.pool.breakers.failure(f.worker)
            if sent or not may_retry:
                raise
            failed.add(f.worker.worker_id)
            self.metrics.retries.labels(f"{f.leg}_{f.worker_code.name}").inc()
            log.info("room %d: retrying on another pair after %s", room, f.message)
            yield None
        finally:
            self.pool.release(route)

    async def _deltas(self, route: Route, room: int, prompt_ids: list[int],
                      sampling: cpb.SamplingParams, detok: Choices,
                      obs: RequestObserver | None, deadline: float | None = None,
                      ) -> AsyncIterator[Delta]:
        """The pair's token stream as Deltas (text, stop strings, usage), every choice's
        (each Delta's index says which)."""
        # aclosing: returning early (stop string) cancels both calls now, not when collected
        async with contextlib.aclosing(self._legs(route, room, prompt_ids, sampling,
                                                  obs, deadline)) as chunks:
            async for chunk in chunks:
                delta = Delta(room, list(chunk.token_ids), logprobs=list(chunk.logprobs),
                              finish_reason=chunk.finish_reason, index=chunk.index)
                stopped = detok.take(delta, chunk.usage)
                if stopped is None:
                    continue  # its choice ended here (stop string): the worker's tail of it
                if obs is not None:
                    obs.tokens(len(delta.token_ids))
                yield delta
                if stopped and detok.done:
                    return  # stop strings ended every choice here: closing cancels both legs
        if detok.n > 1 and not detok.done:  # e.g. a decode worker that does not know n
            raise LegFailed("decode", route.decode, grpc.StatusCode.INTERNAL,
                            f"decode worker {route.decode.address} ended room {room} with "
                            f"{detok.ended.count(False)} of {detok.n} choices unfinished")

    def _succeeded(self, route: Route) -> None:
        """The pair delivered its first token."""
        if route.ticket is not None:  # per-request disaggregation: measured TTFT
            route.ticket.first_token()
        for w in (route.prefill, route.decode):
            if w is not None:
                self.pool.breakers.success(w)

    def _calls(self, route: Route, room: int, prompt_ids: list[int],
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

    async def _legs(self, route: Route, room: int, prompt_ids: list[int],
                    sampling: cpb.SamplingParams, obs: RequestObserver | None = None,
                    deadline: float | None = None) -> AsyncIterator[decode_pb2.DecodeChunk]:
        d, p = route.decode, route.prefill
        # the calls' client spans (and traceparent) hang under the request's span
        with tracing.attached(obs.context if obs is not None else None):
            dcall, pcall = self._calls(route, room, prompt_ids, sampling, deadline)
            ptask = asyncio.ensure_future(pcall) if pcall is not None else None
        if ptask is not None:
            if obs is not None:
                ptask.add_done_callback(lambda t: obs.prefill_done(t.result().timings)
                                        if not t.cancelled() and not t.exception() else None)
            # a failed prefill ends the decode stream at once (it would otherwise wait
            # for the KV until the waiting timeout)
            ptask.add_done_callback(
                lambda t: dcall.cancel() if not t.cancelled() and t.exception() else None)
            if route.ticket is not None:  # the prefill's timings calibrate pd_mode's model
                ptask.add_done_callback(lambda t: route.ticket.prefill_done(t.result())
                                        if not t.cancelled() and not t.exception() else None)
        try:
            async for chunk in dcall:
                if obs is not None and chunk.HasField("timings"):
                    obs.decode_first(chunk.timings)
                yield chunk
            if ptask is not None:
                await asyncio.wait([ptask], timeout=_PREFILL_TAIL_S)
        except grpc.aio.AioRpcError as e:
            raise self._failure(ptask, p, d, e) from None
        except asyncio.CancelledError:
            if ptask is not None and ptask.done() and not ptask.cancelled() and ptask.exception():
                raise self._failure(ptask, p, d, None) from None
            raise  # our own cancellation (client gone)
        finally:
            dcall.cancel()
            if pcall is not None and not pcall.done():
                pcall.cancel()

    @staticmethod
    def _failure(ptask, p, d, e) -> LegFailed:
        """Prefer the prefill's error when it failed: the decode's is then a consequence."""
        if ptask is not None and ptask.done() and not ptask.cancelled():
            pe = ptask.exception()
            if isinstance(pe, grpc.aio.AioRpcError):
                return _leg_error("prefill", p, pe)
        if e is None:
            return LegFailed("decode", d, grpc.StatusCode.UNAVAILABLE,
                             f"decode worker {d.address} failed")
        return _leg_error("decode", d, e)


def _check_deadline(deadline: float | None) -> None:
    """DEADLINE_EXCEEDED once `deadline` (time.monotonic()) has passed."""
    if deadline is not None and time.monotonic() >= deadline:
        raise GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           "The request's deadline passed before it completed.")

