"""REST by generic transcoding of `google.api.http` annotations (aiohttp).

At start-up `http_routes(service)` reads every method's HttpRule from the service
descriptor; `build_app` turns each into an aiohttp route that
  - parses the JSON body (body: "*") into the method's request message with
    `json_format.ParseDict(..., ignore_unknown_fields=True)`; path variables
    ("{name}") set fields of the same name;
  - calls the servicer method of the same name with a `RestContext` (the servicer
    neither knows nor cares that the call came over HTTP);
  - writes the response message(s) as JSON with OpenAI's snake_case names, or, for a
    server-streaming method whose request has `stream: true`, as server-sent events
    ending in `data: [DONE]`.
gRPC statuses become HTTP statuses and OpenAI's error JSON. Union-typed OpenAI fields
are google.protobuf.Value in the protos, so no per-endpoint normalisation is needed.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
from aiohttp import web
from google.api import annotations_pb2
from google.protobuf import descriptor as _d
from google.protobuf import json_format, message_factory

from pdmesh.services.gateway import limits
from pdmesh.telemetry import tracing

log = logging.getLogger(__name__)

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.CANCELLED: 499,
}
# OpenAI's error types; any other 4xx (404 unknown path or model, 405, 413) is the
# client's mistake: invalid_request_error, as OpenAI answers them
ERROR_TYPE = {401: "authentication_error", 403: "permission_error",
              429: "rate_limit_error", 503: "service_unavailable_error"}
# OpenAI's own code for a 429 (the openai client retries it, after Retry-After)
ERROR_CODE = {429: "rate_limit_exceeded"}
# trailing metadata of a failed call that REST passes on as response headers
_HEADER_TRAILERS = frozenset({"retry-after", "retry-after-ms"})
_PLAIN_STRING, _INT64 = _d.FieldDescriptor.TYPE_STRING, (
    _d.FieldDescriptor.TYPE_INT64, _d.FieldDescriptor.TYPE_UINT64,
    _d.FieldDescriptor.TYPE_SINT64, _d.FieldDescriptor.TYPE_FIXED64)
_WELL_KNOWN = ("google.protobuf.Value", "google.protobuf.Struct", "google.protobuf.ListValue")
# Plain strings that OpenAI always sends, even empty: a streamed completion chunk whose
# delta holds no text (e.g. the last one, with only finish_reason) still has "text": "",
# and clients index choices[0]["text"] unconditionally (sglang's bench_serving does).
_KEEP_EMPTY = frozenset({"pdmesh.v1.CompletionChoice.text"})
_BIG_BODY = 256 << 10  # request bodies larger than this are parsed on a thread
# aiohttp's default (1 MiB) would refuse a long-context prompt (413); SMG takes 512 MB.
# The gateway passes GatewayConfig.max_body_bytes (PDMESH_GATEWAY_MAX_BODY_BYTES).
MAX_BODY = 32 << 20


@dataclass(frozen=True)
class HttpRoute:
    """One annotated RPC: HTTP verb, path template, body selector and the method."""

    verb: str
    path: str
    body: str
    method: _d.MethodDescriptor


def http_routes(service: _d.ServiceDescriptor) -> list[HttpRoute]:
    """Every method of `service` with a google.api.http option, as HttpRoutes."""
    routes = []
    for m in service.methods:
        opts = m.GetOptions()
        if not opts.HasExtension(annotations_pb2.http):
            continue
        rule = opts.Extensions[annotations_pb2.http]
        verb = rule.WhichOneof("pattern")
        if verb == "custom":
            verb, path = rule.custom.kind, rule.custom.path
        else:
            path = getattr(rule, verb)
        routes.append(HttpRoute(verb.upper(), path, rule.body, m))
    return routes


class RestAbort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, trailers=()) -> None:
        super().__init__(details)
        self.code, self.details = code, details
        self.headers = {k: v for k, v in trailers or () if k in _HEADER_TRAILERS}


class RestContext:
    """The part of grpc.aio.ServicerContext the Gateway servicer uses. `sse`: a stream
    may yield ready-made server-sent event bytes instead of response messages."""

    sse = True

    def __init__(self, request: web.Request, timeout: float | None = None) -> None:
        self._md = tuple((k.lower(), v) for k, v in request.headers.items())
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def invocation_metadata(self):
        return self._md

    def time_remaining(self) -> float | None:
        """Seconds left of the request's deadline (request_timeout), None without one."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=(),
                    ) -> None:
        raise RestAbort(code, details, trailing_metadata)


def error_type(status: int) -> str:
    """OpenAI's `type` for an HTTP status."""
    if status in ERROR_TYPE:
        return ERROR_TYPE[status]
    return "invalid_request_error" if 400 <= status < 500 else "internal_error"


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    """OpenAI's error JSON (`headers`: e.g. Retry-After on a 429)."""
    body = {"error": {"message": message, "type": error_type(status),
                      "param": param, "code": ERROR_CODE.get(status, status)}}
    return web.json_response(body, status=status, headers=headers)


def to_json(msg) -> dict:
    """OpenAI JSON of a response message: snake_case names, zero numbers and false
    printed, unset plain strings omitted, 64-bit integers as numbers (not strings)."""
    d = json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                  always_print_fields_with_no_presence=True)
    _clean(msg.DESCRIPTOR, d)
    return d


def _clean(desc: _d.Descriptor, d: dict) -> None:
    for f in desc.fields:
        if f.name not in d:
            continue
        v = d[f.name]
        if f.type == _PLAIN_STRING and not f.is_repeated and v == "" \
                and f.full_name not in _KEEP_EMPTY:
            del d[f.name]
        elif f.type in _INT64:
            d[f.name] = [int(x) for x in v] if f.is_repeated else int(v)
        elif f.message_type is not None and f.message_type.full_name not in _WELL_KNOWN \
                and not f.message_type.GetOptions().map_entry:
            for item in (v if f.is_repeated else [v]):
                _clean(f.message_type, item)


def parse_body(body: bytes, msg) -> None:
    """A JSON object into `msg` (unknown fields ignored, unless they ask for something
    pdmesh does not do: limits.Unsupported); ValueError / ParseError."""
    payload = orjson.loads(body or b"{}")
    if not isinstance(payload, dict):
        raise ValueError("the request body must be a JSON object")
    limits.check_unsupported(payload, msg.DESCRIPTOR.full_name)
    json_format.ParseDict(payload, msg, ignore_unknown_fields=True)


def request_timeout(headers: Any, streaming: bool) -> float | None:
    """The request's deadline in seconds from now, from its headers: `x-pdmesh-timeout`
    (any client), else for a non-streamed request the openai clients' own
    `x-stainless-read-timeout` (they give up after it, so work past it is wasted; for a
    stream it bounds the gap between chunks, not the request). None: no deadline.
    ValueError for an `x-pdmesh-timeout` that is not a positive number of seconds."""
    raw = headers.get("x-pdmesh-timeout")
    if raw is not None:
        seconds = _positive_seconds(raw)
        if seconds is None:
            raise ValueError(f"x-pdmesh-timeout must be a positive number of seconds, "
                             f"got {raw[:40]!r}")
        return seconds
    raw = None if streaming else headers.get("x-stainless-read-timeout")
    return None if raw is None else _positive_seconds(raw)  # not ours to refuse


def _positive_seconds(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if 0 < value < float("inf") else None


def _handler(route: HttpRoute, servicer: Any):
    request_cls = message_factory.GetMessageClass(route.method.input_type)
    rpc = getattr(servicer, route.method.name)

    async def handle(http: web.Request) -> web.StreamResponse:
        """The REST entry span (W3C traceparent from the headers) around the call."""
        with tracing.http_server_span(http.method, route.path, http.headers) as span:
            resp = await call(http)
            span.set_attribute("http.response.status_code", resp.status)
            return resp

    async def call(http: web.Request) -> web.StreamResponse:
        msg = request_cls()
        try:
            if route.body:
                body = await http.read()
                if len(body) > _BIG_BODY:  # parsing megabytes must not stall other streams
                    await asyncio.to_thread(parse_body, body, msg)
                else:
                    parse_body(body, msg)
            for name, value in http.match_info.items():
                setattr(msg, name, value)
        except limits.Unsupported as e:
            return error_response(400, str(e), param=e.param)
        except (ValueError, json_format.ParseError) as e:  # JSONDecodeError is a ValueError
            return error_response(400, f"Invalid request body: {e}")
        try:
            timeout = request_timeout(http.headers, bool(getattr(msg, "stream", False)))
        except ValueError as e:
            return error_response(400, str(e))
        ctx = RestContext(http, timeout)
        try:
            if not route.method.server_streaming:
                return web.json_response(to_json(await rpc(msg, ctx)))
            stream = rpc(msg, ctx)
            first = await stream.__anext__()  # errors before the first message -> HTTP status
            if not getattr(msg, "stream", False):
                await stream.aclose()
                return web.json_response(to_json(first))
        except RestAbort as e:
            return error_response(HTTP_STATUS.get(e.code, 500), e.details, headers=e.headers)
        except StopAsyncIteration:
            return error_response(500, "the RPC returned no response")
        return await _sse(http, first, stream)

    return handle


async def _sse(http: web.Request, first, stream) -> web.StreamResponse:
    """Server-sent events: one `data:` line per message, then `data: [DONE]`. A stream
    may yield bytes: events already encoded (services/gateway/chunks.py).
    A failure after the first event is sent as an error event (the status is sent)."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(http)
    try:
        await resp.write(first if type(first) is bytes else _event(to_json(first)))
        async for m in stream:
            await resp.write(m if type(m) is bytes else _event(to_json(m)))
    except RestAbort as e:
        status = HTTP_STATUS.get(e.code, 500)
        await resp.write(_event({"error": {"message": e.details, "code": status,
                                           "type": error_type(status), "param": None}}))
    except ConnectionError:  # the client went away: aclose below cancels both legs
        return resp
    finally:
        await stream.aclose()
    await resp.write_eof(b"data: [DONE]\n\n")  # the last chunk and the end: one write
    return resp


def _event(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def http_error_message(e: web.HTTPException, request: web.Request, max_body: int) -> str:
    """What was wrong, for aiohttp's own refusals (unknown path, wrong method, big body)."""
    where = f"{request.method} {request.path}"
    if isinstance(e, web.HTTPNotFound):
        return f"Unknown URL: {where}"
    if isinstance(e, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(e.allowed_methods))
        return f"Method {request.method} is not allowed on {request.path} (allowed: {allowed})"
    if isinstance(e, web.HTTPRequestEntityTooLarge):
        return limits.body_too_large(max_body, request.content_length)
    return f"{e.reason}: {where}"


def _error_middleware(max_body: int):
    @web.middleware
    async def errors(request: web.Request, handler):
        """Unknown routes, wrong methods, big bodies and crashes answer in OpenAI's
        error JSON."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            return error_response(e.status, http_error_message(e, request, max_body))
        except Exception:  # noqa: BLE001 - the server keeps serving; the log has the trace
            log.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(500, "internal server error")
    return errors


def build_app(servicer: Any, services: list[_d.ServiceDescriptor],
              max_body: int = MAX_BODY) -> web.Application:
    """An aiohttp app with one route per annotated RPC of `services`; bodies beyond
    `max_body` bytes get 413."""
    app = web.Application(middlewares=[_error_middleware(max_body)], client_max_size=max_body)
    for service in services:
        for route in http_routes(service):
            app.router.add_route(route.verb, route.path, _handler(route, servicer))
    return app
