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

Here: admission, routing and retries (Dispatcher); the pair's calls and their stream are
legs.py, the failures (status mapping, which leg is blamed) failures.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import AsyncIterator

import grpc

from pdmesh.v1 import common_pb2 as cpb
from pdmesh.services.gateway.admission import Admission, Rejected
from pdmesh.services.gateway.breaker import ResilienceMetrics, RetryPolicy
from pdmesh.services.gateway.choices import Choices
from pdmesh.services.gateway.delta import Delta
from pdmesh.services.gateway.failures import (GatewayError, LegFailed, check_deadline,
                                              deadline_error)
from pdmesh.services.gateway.legs import Legs
from pdmesh.services.gateway.model_info import ModelInfo, load_model_info
from pdmesh.services.gateway.observe import RequestObserver
from pdmesh.services.gateway.pool import NoRoute, Route, WorkerPool

# GatewayError, LegFailed, Delta, ModelInfo and load_model_info are imported from here
# by the gateway's other modules and by tests: their homes are the modules above
__all__ = ["Delta", "Dispatcher", "GatewayError", "LegFailed", "ModelInfo",
           "load_model_info"]
log = logging.getLogger(__name__)


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
        self.legs = Legs()

    async def warm_up(self, timeout: float = 2.0) -> int:
        """Before this process says it listens: wait (up to `timeout`) for the registry's
        member list and open a channel to every worker in it, so no request pays for a
        connection (each gateway process has its own). Returns the channels made ready."""
        if not await asyncio.to_thread(self.pool.synced.wait, timeout):
            return 0
        return await self.legs.connect(sorted({w.address for w in self.pool.workers()}),
                                       timeout)

    async def close(self) -> None:
        self.admission.close()
        await self.legs.close()

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
        check_deadline(deadline)
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
            if not self._may_retry(f, deadline, may_retry and not sent):
                raise
            failed.add(f.worker.worker_id)
            self.metrics.retries.labels(f"{f.leg}_{f.worker_code.name}").inc()
            log.info("room %d: retrying on another pair after %s", room, f.message)
            yield None
        finally:
            self.pool.release(route)

    def _may_retry(self, f: LegFailed, deadline: float | None, may_retry: bool) -> bool:
        """Whether another pair may be tried after `f` (the failed worker's breaker is
        told when the failure counts against it); raises DEADLINE_EXCEEDED when the
        client's deadline, which the legs carried, ended it: not the workers' fault."""
        if deadline is not None and (f.worker_code == grpc.StatusCode.DEADLINE_EXCEEDED
                                     or time.monotonic() >= deadline):
            raise deadline_error() from None
        if not self.retry.retryable(f.worker_code):
            return False  # the request's own fault: the same on any worker
        if f.worker_code != grpc.StatusCode.RESOURCE_EXHAUSTED:  # busy is not broken
            self.pool.breakers.failure(f.worker)
        return may_retry

    async def _deltas(self, route: Route, room: int, prompt_ids: list[int],
                      sampling: cpb.SamplingParams, detok: Choices,
                      obs: RequestObserver | None, deadline: float | None = None,
                      ) -> AsyncIterator[Delta]:
        """The pair's token stream as Deltas (text, stop strings, usage), every choice's
        (each Delta's index says which)."""
        # aclosing: returning early (stop string) cancels both calls now, not when collected
        async with contextlib.aclosing(self.legs.stream(route, room, prompt_ids, sampling,
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
        if not detok.done:  # an OK stream without every end: never a silent truncation
            raise LegFailed("decode", route.decode, grpc.StatusCode.INTERNAL,
                            f"decode worker {route.decode.address} ended room {room} with "
                            f"{detok.ended.count(False)} of {detok.n} choices unfinished")

    def _succeeded(self, route: Route) -> None:
        """The pair delivered its first token."""
        self.pool.prefilled(route)  # its prompt no longer waits for a prefill
        if route.ticket is not None:  # per-request disaggregation: measured TTFT
            route.ticket.first_token()
        for w in (route.prefill, route.decode):
            if w is not None:
                self.pool.breakers.success(w)
