"""OpenTelemetry tracing for every pdmesh service process.

`setup(config, service)` installs a TracerProvider (parent-based ratio sampler, batch
export to OTLP and/or a JSON-lines file) when the config asks for traces; otherwise
nothing is installed: no interceptor is added to any server or channel, every helper
here returns at its first line, and the API's tracer is the no-op one.

W3C trace context crosses every RPC through opentelemetry-instrumentation-grpc's
interceptors (`aio_server_interceptors`, `aio_client_interceptors`), so one request is one
trace from the gateway's entry span down to the prefill's KV write.

Work measured on another thread (the engine loop) becomes a span after the fact with
`record_span(name, start, end)` from `time.monotonic()` stamps, so the engine loop never
calls into OpenTelemetry.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Iterator, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract

from pdmesh.config import TelemetryConfig

log = logging.getLogger(__name__)
TRACER = trace.get_tracer("pdmesh")  # proxies to the provider `setup` installs
_enabled = False
# RPCs never traced: liveness and membership plumbing, not requests
_UNTRACED_METHODS = ("Heartbeat", "Watch")


def setup(config: TelemetryConfig, service: str) -> bool:
    """Install tracing for this process as `service` (e.g. "pdmesh-decode"); True when on."""
    global _enabled
    if not config.tracing or _enabled:
        return _enabled
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        # process.pid tells a service's processes apart (gateway --processes N, a worker's
        # RPC front and its engine core): which one a slow span ran in
        resource=Resource.create({"service.name": service, "service.namespace": "pdmesh",
                                  "process.pid": os.getpid()}),
        sampler=ParentBased(TraceIdRatioBased(config.trace_sample_ratio)))
    if config.trace_file:
        from pdmesh.telemetry.otlp_file import OtlpJsonLinesExporter
        provider.add_span_processor(BatchSpanProcessor(OtlpJsonLinesExporter(config.trace_file)))
    if config.otlp_endpoint:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(config)))
    trace.set_tracer_provider(provider)  # flushed by the provider's atexit hook
    _enabled = True
    log.info("tracing on: service %s, sample ratio %g, otlp %s, file %s", service,
             config.trace_sample_ratio, config.otlp_endpoint or "-", config.trace_file or "-")
    return True


def _otlp_exporter(config: TelemetryConfig):
    endpoint = config.otlp_endpoint
    if config.otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    if not endpoint.rstrip("/").endswith("/v1/traces"):  # a base endpoint, as the spec says
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return OTLPSpanExporter(endpoint=endpoint)


def enabled() -> bool:
    return _enabled


def shutdown() -> None:
    """Flush and stop exporting (tests and graceful shutdown; atexit does it otherwise)."""
    if _enabled:
        trace.get_tracer_provider().shutdown()


# -- spans -------------------------------------------------------------------------------
def start_span(name: str, attributes: Mapping[str, Any] | None = None,
               context: otel_context.Context | None = None, start_ns: int | None = None,
               kind: trace.SpanKind = trace.SpanKind.INTERNAL) -> trace.Span:
    """A span to end by hand (child of `context`, else of the current span)."""
    if not _enabled:
        return trace.INVALID_SPAN
    return TRACER.start_span(name, context=context, kind=kind, attributes=attributes,
                             start_time=start_ns)


def context_of(span: trace.Span) -> otel_context.Context | None:
    """A context whose current span is `span` (None when tracing is off)."""
    return trace.set_span_in_context(span) if _enabled else None


@contextlib.contextmanager
def attached(ctx: otel_context.Context | None) -> Iterator[None]:
    """Make `ctx` current for a block without awaits or yields (e.g. creating RPCs)."""
    if ctx is None:
        yield
        return
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[trace.Span]:
    """A child of the current span for a block (synchronous code)."""
    if not _enabled:
        yield trace.INVALID_SPAN
        return
    with TRACER.start_as_current_span(name, attributes=attributes) as s:
        yield s


def record_span(name: str, start: float, end: float, attributes: Mapping[str, Any] | None = None,
                context: otel_context.Context | None = None) -> None:
    """A finished span from two time.monotonic() stamps (child of `context` or current)."""
    if not _enabled:
        return
    offset = time.time_ns() - time.monotonic_ns()  # one offset: the duration stays exact
    s = TRACER.start_span(name, context=context, attributes=attributes,
                          start_time=offset + int(start * 1e9))
    s.end(end_time=offset + int(max(start, end) * 1e9))


@contextlib.contextmanager
def http_server_span(method: str, route: str, headers: Mapping[str, str]) -> Iterator[trace.Span]:
    """The REST entry span: W3C context from the request's headers, kind SERVER."""
    if not _enabled:
        yield trace.INVALID_SPAN
        return
    with TRACER.start_as_current_span(
            f"{method} {route}", context=extract(headers), kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route}) as s:
        yield s


# -- gRPC --------------------------------------------------------------------------------
def _traced(details) -> bool:
    method = getattr(details, "method", None) or getattr(details, "full_method", "") or ""
    if isinstance(method, bytes):
        method = method.decode()
    return not (method.startswith("/grpc.") or method.rsplit("/", 1)[-1] in _UNTRACED_METHODS)


def aio_server_interceptors() -> list:
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    return [aio_server_interceptor(filter_=_traced)]


def aio_client_interceptors() -> list | None:
    if not _enabled:
        return None
    from opentelemetry.instrumentation.grpc import aio_client_interceptors as make
    return make(filter_=_traced)
