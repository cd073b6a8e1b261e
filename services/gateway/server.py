"""`pdmesh.v1.Gateway` over grpc.aio; the REST transcoder calls the same methods.

Every RPC raises no Python exception to its caller: request and mesh failures are
GatewayErrors, turned into a gRPC status by `context.abort` (the REST context maps
that status to an HTTP status and OpenAI's error JSON).
"""
from __future__ import annotations

import contextlib
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdmesh.telemetry import tracing
from pdmesh.telemetry.metrics import GatewayMetrics
from pdmesh.v1 import common_pb2 as cpb
from pdmesh.v1 import gateway_pb2 as gpb
from pdmesh.v1 import gateway_pb2_grpc as gpb_grpc
from pdmesh.v1 import openai_pb2 as opb
from pdmesh.services.gateway import openai_api as oa
from pdmesh.services.gateway.dispatch import Dispatcher, GatewayError
from pdmesh.services.gateway.observe import RequestObserver

SERVICE_NAME = gpb.DESCRIPTOR.services_by_name["Gateway"].full_name


class GatewayServicer(gpb_grpc.GatewayServicer):
    """The Gateway RPCs over one Dispatcher (pool + model)."""

    def __init__(self, dispatcher: Dispatcher, api_key: str | None = None,
                 metrics: GatewayMetrics | None = None) -> None:
        self.dispatcher, self.model, self.api_key = dispatcher, dispatcher.model, api_key
        self.metrics = metrics or GatewayMetrics()

    def _check_key(self, context) -> None:
        if not self.api_key:
            return
        md = {k.lower(): v for k, v in (context.invocation_metadata() or ())}
        if md.get("authorization", "") != f"Bearer {self.api_key}":
            raise GatewayError(grpc.StatusCode.UNAUTHENTICATED, "Invalid or missing API key "
                               "(expected 'Authorization: Bearer <key>').")

    def _observe(self, endpoint: str, operation: str) -> RequestObserver:
        return RequestObserver(self.metrics, endpoint, operation, self.model.name)

    async def _run(self, context, obs: RequestObserver, prompt_ids, sp,
                   detokenize=True) -> AsyncIterator:
        """Deltas of one request; GatewayError -> context.abort. Ends `obs` with the
        request's status (CANCELLED when the consumer stopped early)."""
        status, last = "CANCELLED", None
        try:
            async with contextlib.aclosing(
                    self.dispatcher.generate(prompt_ids, sp, detokenize, obs)) as deltas:
                async for delta in deltas:
                    last = delta
                    yield delta
            status = "OK"
        except GatewayError as e:
            status = e.code.name
            await context.abort(e.code, e.message)
        finally:
            obs.finish(status, last.finish_reason if last else 0, last.usage if last else None)

    async def _prepare(self, context, obs: RequestObserver, fn):
        """Authorize, then tokenize + validate with `fn` -> (prompt ids, sampling); a
        GatewayError ends `obs` and aborts the call."""
        try:
            self._check_key(context)
            with tracing.attached(obs.context), tracing.span("tokenize") as span:
                ids, sp = fn()
                span.set_attribute("gen_ai.usage.input_tokens", len(ids))
        except GatewayError as e:
            obs.finish(e.code.name)
            await context.abort(e.code, e.message)
        obs.request(len(ids), sp)
        return ids, sp

    async def Generate(self, request: gpb.GenerateRequest, context):
        """Stream token ids (and text when return_text) for a text or token-id prompt."""
        def prepare():
            oa.check_model(request.model, self.model)
            if bool(request.text) == bool(request.token_ids):
                raise oa.invalid("exactly one of 'text' and 'token_ids' must be set")
            ids = list(request.token_ids) or self.model.tokenizer.encode(request.text)
            return ids, self._native_sampling(request.sampling_params, len(ids))
        obs = self._observe("Generate", "text_completion")
        ids, sp = await self._prepare(context, obs, prepare)
        async for d in self._run(context, obs, ids, sp, detokenize=request.return_text):
            yield self._generate_response(d)

    async def Chat(self, request: gpb.ChatRequest, context):
        """Stream the assistant's reply (token ids and text) to a conversation."""
        def prepare():
            oa.check_model(request.model, self.model)
            ids = oa.chat_prompt(request.messages, self.model)
            return ids, self._native_sampling(request.sampling_params, len(ids))
        obs = self._observe("Chat", "chat")
        ids, sp = await self._prepare(context, obs, prepare)
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
        oa.validate(out)
        return out

    @staticmethod
    def _generate_response(d) -> gpb.GenerateResponse:
        return gpb.GenerateResponse(token_ids=d.token_ids, text=d.text, logprobs=d.logprobs,
                                    finish_reason=d.finish_reason, usage=d.usage, room=d.room)

    async def ChatCompletions(self, request: opb.ChatCompletionRequest, context):
        """OpenAI chat completions: one response, or chunks when stream is true."""
        def prepare():
            oa.check_model(request.model, self.model)
            if request.HasField("n") and request.n != 1:
                raise oa.invalid("only n=1 is supported")
            ids = oa.chat_prompt(request.messages, self.model)
            mt = (request.max_completion_tokens if request.HasField("max_completion_tokens")
                  else request.max_tokens if request.HasField("max_tokens") else None)
            lp = (request.top_logprobs if request.HasField("top_logprobs") else 0) \
                if request.logprobs else None
            return ids, oa.sampling(request, len(ids), self.model, mt, lp)
        obs = self._observe("ChatCompletions", "chat")
        ids, sp = await self._prepare(context, obs, prepare)
        created, want_lp = oa.now(), request.logprobs
        if not request.stream:
            text, last, room, lps = [], None, 0, []
            async for d in self._run(context, obs, ids, sp):
                text.append(d.text), lps.extend(d.logprobs)
                last, room = d, d.room
            resp = oa.header(opb.ChatCompletionResponse, "chatcmpl-", room, self.model,
                             "chat.completion", created)
            choice = resp.choices.add(index=0, finish_reason=oa.FINISH.get(last.finish_reason, "stop"))
            choice.message.role = "assistant"
            choice.message.content.string_value = "".join(text)
            if want_lp:
                choice.logprobs.CopyFrom(oa.chat_logprobs(oa.Delta(room, logprobs=lps), self.model))
            resp.usage.CopyFrom(oa.usage_proto(last.usage))
            yield resp
            return
        first = True
        async for d in self._run(context, obs, ids, sp):
            chunk = oa.header(opb.ChatCompletionResponse, "chatcmpl-", d.room, self.model,
                              "chat.completion.chunk", created)
            choice = chunk.choices.add(index=0)
            if first:
                choice.delta.role, first = "assistant", False
            choice.delta.content.string_value = d.text
            if want_lp:
                choice.logprobs.CopyFrom(oa.chat_logprobs(d, self.model))
            if d.finish_reason:
                choice.finish_reason = oa.FINISH.get(d.finish_reason, "stop")
            yield chunk
            if d.finish_reason and request.stream_options.include_usage:
                yield self._usage_chunk(opb.ChatCompletionResponse, "chatcmpl-",
                                        "chat.completion.chunk", d, created)

    def _usage_chunk(self, cls, prefix: str, obj: str, d, created: int):
        """The final stream chunk that only carries usage (stream_options.include_usage)."""
        chunk = oa.header(cls, prefix, d.room, self.model, obj, created)
        chunk.usage.CopyFrom(oa.usage_proto(d.usage))
        return chunk

    async def Completions(self, request: opb.CompletionRequest, context):
        """OpenAI (legacy) completions: one response, or chunks when stream is true."""
        def prepare():
            oa.check_model(request.model, self.model)
            if request.HasField("n") and request.n != 1:
                raise oa.invalid("only n=1 is supported")
            ids = oa.completion_prompt(request.prompt, self.model)
            mt = request.max_tokens if request.HasField("max_tokens") else 16
            lp = request.logprobs if request.HasField("logprobs") else None
            return ids, oa.sampling(request, len(ids), self.model, mt, lp)
        obs = self._observe("Completions", "text_completion")
        ids, sp = await self._prepare(context, obs, prepare)
        created, want_lp = oa.now(), request.HasField("logprobs")
        echo = self.model.tokenizer.decode(ids) if request.echo else ""
        text, offset, last, lps = [echo], len(echo), None, []
        async for d in self._run(context, obs, ids, sp):
            last = d
            if not request.stream:
                text.append(d.text), lps.extend(d.logprobs)
                continue
            chunk = oa.header(opb.CompletionResponse, "cmpl-", d.room, self.model,
                              "text_completion", created)
            choice = chunk.choices.add(index=0, text=text.pop() + d.text if text else d.text)
            if want_lp:
                choice.logprobs.CopyFrom(oa.completion_logprobs(d, self.model, offset))
            offset += len(choice.text)
            if d.finish_reason:
                choice.finish_reason = oa.FINISH.get(d.finish_reason, "stop")
            yield chunk
            if d.finish_reason and request.stream_options.include_usage:
                yield self._usage_chunk(opb.CompletionResponse, "cmpl-", "text_completion",
                                        d, created)
        if not request.stream:
            resp = oa.header(opb.CompletionResponse, "cmpl-", last.room, self.model,
                             "text_completion", created)
            choice = resp.choices.add(index=0, text="".join(text),
                                      finish_reason=oa.FINISH.get(last.finish_reason, "stop"))
            if want_lp:
                choice.logprobs.CopyFrom(oa.completion_logprobs(
                    oa.Delta(last.room, logprobs=lps), self.model, len(echo)))
            resp.usage.CopyFrom(oa.usage_proto(last.usage))
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
    server = grpc.aio.server(interceptors=tracing.aio_server_interceptors())
    gpb_grpc.add_GatewayServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(addr)
    if port == 0:
        raise RuntimeError(f"could not bind gRPC server to {addr}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port
