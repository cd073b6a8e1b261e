"""`pdmesh.v1.Gateway` over grpc.aio; the REST transcoder calls the same methods.

Every RPC raises no Python exception to its caller: request and mesh failures are
GatewayErrors, turned into a gRPC status by `context.abort` (the REST context maps
that status to an HTTP status and OpenAI's error JSON).
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import grpc

from pdmesh import auth
from pdmesh.config import GatewayConfig
from pdmesh.grpc_util import Servicer, create_aio_server
from pdmesh.telemetry import tracing
from pdmesh.telemetry.metrics import GatewayMetrics
from pdmesh.v1 import common_pb2 as cpb
from pdmesh.v1 import gateway_pb2 as gpb
from pdmesh.v1 import gateway_pb2_grpc as gpb_grpc
from pdmesh.v1 import openai_pb2 as opb
from pdmesh.services.gateway import errors, limits
from pdmesh.services.gateway import openai_api as oa
from pdmesh.services.gateway.choices import RequestUsage, choice_count
from pdmesh.services.gateway.chunks import ProtoChunks, SseChunks
from pdmesh.services.gateway.dispatch import Dispatcher, GatewayError
from pdmesh.services.gateway.observe import RequestObserver

SERVICE_NAME = gpb.DESCRIPTOR.services_by_name["Gateway"].full_name
# Requests larger than this are tokenized on a thread. Chat template + tokenize take
# ~0.25 µs a byte (256 B: 124 µs, 1 KiB: 305 µs, 4 KiB: 1 ms, 16 KiB: 4 ms) and a thread
# hop 46-67 µs: past 2 KiB the hop costs far less than the stall it saves the others.
INLINE_PROMPT_BYTES = 2 << 10


class GatewayServicer(gpb_grpc.GatewayServicer):
    """The Gateway RPCs over one Dispatcher (pool + model)."""

    def __init__(self, dispatcher: Dispatcher, api_key: str | None = None,
                 metrics: GatewayMetrics | None = None,
                 config: GatewayConfig | None = None) -> None:
        self.dispatcher, self.model, self.api_key = dispatcher, dispatcher.model, api_key
        self.metrics = metrics or GatewayMetrics()
        self.limits = config or GatewayConfig()  # request limits (max_stop_strings, ...)

    def _check_key(self, context) -> None:
        if not self.api_key:
            return
        md = {k.lower(): v for k, v in (context.invocation_metadata() or ())}
        if not auth.matches(md.get("authorization", ""), f"Bearer {self.api_key}"):  # const time
            raise GatewayError(grpc.StatusCode.UNAUTHENTICATED, "Invalid or missing API key "
                               "(expected 'Authorization: Bearer <key>').")

    def _observe(self, endpoint: str, operation: str) -> RequestObserver:
        return RequestObserver(self.metrics, endpoint, operation, self.model.name)

    async def _run(self, context, obs: RequestObserver, prompt_ids, sp,
                   detokenize=True) -> AsyncIterator:
        """Deltas of one request (every choice's); GatewayError -> context.abort. Ends
        `obs` with the request's status (CANCELLED when the consumer stopped early)."""
        status, last, usage = "CANCELLED", None, RequestUsage()
        try:
            # the client's deadline goes on to both legs: gRPC's own, or REST's from its
            # headers (transcoder.request_timeout); a client that gives up early closes
            # the connection, which cancels both legs as well
            timeout = context.time_remaining() if hasattr(context, "time_remaining") else None
            async with contextlib.aclosing(self.dispatcher.generate(
                    prompt_ids, sp, detokenize, obs, timeout=timeout)) as deltas:
                async for delta in deltas:
                    last = delta
                    usage.add(delta)
                    yield delta
            status = "OK"
        except GatewayError as e:
            status = e.code.name
            # no worker address reaches the client: the log has it, under a request id
            await context.abort(e.code, errors.public(e.code, e.message),
                                e.trailers)  # retry-after on 429s
        finally:
            obs.finish(status, last.finish_reason if last else 0, usage.total())

    async def _prepare(self, context, obs: RequestObserver, fn, request):
        """Authorize, then tokenize + validate with `fn` -> (prompt ids, sampling); a
        GatewayError ends `obs` and aborts the call. A large request is tokenized on a
        thread (HF tokenizers releases the GIL), so it does not stall the other streams."""
        try:
            self._check_key(context)
            if request.ByteSize() > INLINE_PROMPT_BYTES:
                ids, sp = await asyncio.to_thread(self._tokenize, obs, fn)
            else:
                ids, sp = self._tokenize(obs, fn)
        except GatewayError as e:
            obs.finish(e.code.name)
            await context.abort(e.code, e.message)
        obs.request(len(ids), sp)
        return ids, sp

    @staticmethod
    def _tokenize(obs: RequestObserver, fn):
        with tracing.attached(obs.context), tracing.span("tokenize") as span:
            ids, sp = fn()
            span.set_attribute("gen_ai.usage.input_tokens", len(ids))
        return ids, sp

    async def Generate(self, request: gpb.GenerateRequest, context):
        """Stream token ids (and text when return_text) for a text or token-id prompt."""
        def prepare():
            oa.check_model(request.model, self.model)
            if bool(request.text) == bool(request.token_ids):
                raise oa.invalid("exactly one of 'text' and 'token_ids' must be set")
            ids = oa.check_token_ids(list(request.token_ids), self.model, "token_ids") \
                or self.model.tokenizer.encode(request.text)
            return ids, self._native_sampling(request.sampling_params, len(ids))
        obs = self._observe("Generate", "text_completion")
        ids, sp = await self._prepare(context, obs, prepare, request)
        async for d in self._run(context, obs, ids, sp, detokenize=request.return_text):
            yield self._generate_response(d)

    async def Chat(self, request: gpb.ChatRequest, context):
        """Stream the assistant's reply (token ids and text) to a conversation."""
        def prepare():
            oa.check_model(request.model, self.model)
            ids = oa.chat_prompt(request.messages, self.model)
            return ids, self._native_sampling(request.sampling_params, len(ids))
        obs = self._observe("Chat", "chat")
        ids, sp = await self._prepare(context, obs, prepare, request)
        async for d in self._run(context, obs, ids, sp):
            yield self._generate_response(d)

    def _native_sampling(self, sp: cpb.SamplingParams, prompt_len: int) -> cpb.SamplingParams:
        out = cpb.SamplingParams()
        out.CopyFrom(sp)
        limit = self.model.max_model_len
        if not out.HasField("max_tokens"):
            out.max_tokens = min(16, max(1, limit - prompt_len))
        if prompt_len + out.max_tokens > limit:
            raise oa.invalid(oa._too_long(prompt_len, out.max_tokens, self.model))
        limits.check_sampling(out, self.limits, "sampling_params.logprobs")
        oa.validate(out)
        return out

    @staticmethod
    def _generate_response(d) -> gpb.GenerateResponse:
        return gpb.GenerateResponse(token_ids=d.token_ids, text=d.text, logprobs=d.logprobs,
                                    finish_reason=d.finish_reason, usage=d.usage, room=d.room,
                                    index=d.index)

    async def ChatCompletions(self, request: opb.ChatCompletionRequest, context):
        """OpenAI chat completions: one response, or chunks when stream is true."""
        def prepare():
            oa.check_model(request.model, self.model)
            ids = oa.chat_prompt(request.messages, self.model)
            mt = (request.max_completion_tokens if request.HasField("max_completion_tokens")
                  else request.max_tokens if request.HasField("max_tokens") else None)
            lp = (request.top_logprobs if request.HasField("top_logprobs") else 0) \
                if request.logprobs else None
            return ids, oa.sampling(request, len(ids), self.model, mt, lp, self.limits,
                                    "top_logprobs")
        obs = self._observe("ChatCompletions", "chat")
        ids, sp = await self._prepare(context, obs, prepare, request)
        created, want_lp = oa.now(), request.logprobs
        if not request.stream:
            got = oa.Collected(sp)
            async for d in self._run(context, obs, ids, sp):
                got.add(d)
            resp = oa.header(opb.ChatCompletionResponse, "chatcmpl-", got.room, self.model,
                             "chat.completion", created)
            for i, text, lps, finish in got.choices():
                choice = resp.choices.add(index=i, finish_reason=finish)
                choice.message.role = "assistant"
                choice.message.content.string_value = text
                if want_lp:
                    choice.logprobs.CopyFrom(oa.chat_logprobs(lps, self.model))
            resp.usage.CopyFrom(oa.usage_proto(got.usage.total()))
            yield resp
            return
        chunks = self._chunks(context, "chat", created, want_lp,
                              request.stream_options.include_usage, n=choice_count(sp))
        async for d in self._run(context, obs, ids, sp):
            for m in chunks.out(d):
                yield m

    def _chunks(self, context, kind: str, created: int, logprobs: bool, include_usage: bool,
                text_prefix: str = "", n: int = 1):
        """The stream's chunk builder: SSE bytes for the REST transcoder (its context
        says `sse`), proto messages for gRPC; `n` choices."""
        cls = SseChunks if getattr(context, "sse", False) else ProtoChunks
        return cls(kind, self.model, created, logprobs, include_usage, text_prefix, n)

    async def Completions(self, request: opb.CompletionRequest, context):
        """OpenAI (legacy) completions: one response, or chunks when stream is true."""
        def prepare():
            oa.check_model(request.model, self.model)
            ids = oa.completion_prompt(request.prompt, self.model)
            mt = request.max_tokens if request.HasField("max_tokens") else 16
            lp = request.logprobs if request.HasField("logprobs") else None
            return ids, oa.sampling(request, len(ids), self.model, mt, lp, self.limits)
        obs = self._observe("Completions", "text_completion")
        ids, sp = await self._prepare(context, obs, prepare, request)
        created, want_lp = oa.now(), request.HasField("logprobs")
        echo = self.model.tokenizer.decode(ids) if request.echo else ""
        if request.stream:
            chunks = self._chunks(context, "completion", created, want_lp,
                                  request.stream_options.include_usage, echo, choice_count(sp))
            async for d in self._run(context, obs, ids, sp):
                for m in chunks.out(d):
                    yield m
            return
        got = oa.Collected(sp, echo)
        async for d in self._run(context, obs, ids, sp):
            got.add(d)
        resp = oa.header(opb.CompletionResponse, "cmpl-", got.room, self.model,
                         "text_completion", created)
        for i, text, lps, finish in got.choices():
            choice = resp.choices.add(index=i, text=text, finish_reason=finish)
            if want_lp:
                choice.logprobs.CopyFrom(oa.completion_logprobs(lps, self.model, len(echo)))
        resp.usage.CopyFrom(oa.usage_proto(got.usage.total()))
        yield resp

    async def ListModels(self, request, context) -> opb.ListModelsResponse:
        """The served model, when at least one worker can serve it."""
        try:
            self._check_key(context)
        except GatewayError as e:
            await context.abort(e.code, e.message)
        resp = opb.ListModelsResponse(object="list")
        if self.dispatcher.pool.workers():
            resp.data.add(id=self.model.name, object="model", created=self.dispatcher.started,
                          owned_by="pdmesh")
        return resp

    async def Health(self, request, context) -> gpb.HealthResponse:
        """"ok" when a route exists; UNAVAILABLE otherwise (REST: 503)."""
        if not self.dispatcher.pool.has_route():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no route: no workers registered")
        return gpb.HealthResponse(status="ok")


async def create_server(addr: str, servicer: GatewayServicer) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server on `addr` with the Gateway, health and reflection."""
    server, port, _ = await create_aio_server(
        addr, [Servicer(servicer, gpb_grpc.add_GatewayServicer_to_server, SERVICE_NAME)])
    return server, port
