"""Prometheus metrics of every pdmesh service (prometheus-client), one registry each.

Every service owns a `CollectorRegistry` (not the process-global one), so tests can
run several services in one process. Workers and the registry serve it on their own
HTTP port (`serve_http`); the gateway serves it at `/metrics` on its REST port.

Metric names and meanings are listed in the README ("Metrics"). Counters that the
services keep as plain ints (the registry's lease table, engine token counts) are read
at scrape time by a `SnapshotCollector`, so nothing on a hot path calls into
prometheus-client except where a histogram needs the individual observation.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import asyncio

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# seconds: 1 ms .. 2 min, dense where TTFT/ITL of a healthy deployment live
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2,
                   0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 120.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayMetrics:
    """Request outcomes and latencies as the gateway sees them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter("pdmesh_gateway_requests", "Requests by endpoint and final "
                                "status (gRPC code name; OK = finished)", ["endpoint", "status"],
                                registry=r)
        self.running = Gauge("pdmesh_gateway_requests_running", "Requests in flight",
                             registry=r, multiprocess_mode="livesum")
        self.ttft = _hist("pdmesh_gateway_time_to_first_token_seconds",
                          "Request arrival at the gateway to its first token", r)
        self.tpot = _hist("pdmesh_gateway_time_per_output_token_seconds",
                          "(e2e - TTFT) / (output tokens - 1), per request", r)
        self.itl = _hist("pdmesh_gateway_inter_token_latency_seconds",
                         "Gap between consecutive token messages of a stream", r)
        self.e2e = _hist("pdmesh_gateway_e2e_request_latency_seconds",
                         "Request arrival to its last token", r)
        self.ttft_part = Histogram(
            "pdmesh_gateway_ttft_part_seconds", "TTFT of PD requests split into prefill "
            "queue, prefill compute, KV transfer (incl. waiting for the decode worker) and "
            "first decode (KV in place to first token out)", ["part"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("pdmesh_gateway_prompt_tokens", "Prompt tokens of "
                                     "finished requests", registry=r)
        self.generation_tokens = Counter("pdmesh_gateway_generation_tokens",
                                         "Tokens streamed to clients", registry=r)
        # admission (services/gateway/admission.py): per process, summed over processes
        self.admission_inflight = Gauge("pdmesh_gateway_admission_inflight", "Requests "
                                        "holding an admission slot", registry=r,
                                        multiprocess_mode="livesum")
        self.admission_queued = Gauge("pdmesh_gateway_admission_queued", "Requests waiting "
                                      "for an admission slot", registry=r,
                                      multiprocess_mode="livesum")
        self.admission_rejected = Counter("pdmesh_gateway_admission_rejected", "Requests "
                                          "turned away (429 / RESOURCE_EXHAUSTED) by reason: "
                                          "queue_full, queue_timeout", ["reason"], registry=r)


class WorkerMetrics:
    """Per-event observations of a prefill or decode worker (gauges: SnapshotCollector)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        # path: the route the bytes took (pdmesh.transfer.route): shm, ipc, mooncake
        self.transfer_bytes = Counter("pdmesh_kv_transfer_bytes", "KV bytes written into "
                                      "decode workers", ["path"], registry=r)
        self.transfer_pages = Counter("pdmesh_kv_transfer_pages", "KV pages written",
                                      ["path"], registry=r)
        self.transfer_seconds = Histogram("pdmesh_kv_transfer_seconds",
                                          "Duration of one room's KV write", ["path"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.transfer_failures = Counter("pdmesh_kv_transfer_failures",
                                         "KV writes that failed", ["path"], registry=r)
        # KV integrity (pdmesh/disagg/integrity.py): stage = prefill (read back after the
        # write and its rewrite) | decode (its pages before adopt)
        self.integrity_failures = Counter("pdmesh_kv_integrity_failures", "Rooms failed "
                                          "because their KV mismatched its checksum",
                                          ["stage"], registry=r)
        self.integrity_retries = Counter("pdmesh_kv_integrity_retries", "KV rewrites after "
                                         "a destination checksum mismatch", registry=r)
        self.bootstrap_timeouts = Counter("pdmesh_prefill_bootstrap_timeouts", "Rooms freed "
                                          "because no Transfer came in time", registry=r)
        self.waiting_timeouts = Counter("pdmesh_decode_waiting_timeouts", "Rooms failed "
                                        "because their KV did not arrive in time", registry=r)
        self.admission_wait = _hist("pdmesh_decode_admission_wait_seconds",
                                    "Decode: request arrival to its KV pages allocated", r)


def _hist(name: str, doc: str, registry: CollectorRegistry) -> Histogram:
    return Histogram(name, doc, buckets=LATENCY_BUCKETS, registry=registry)


class SnapshotCollector:
    """Gauges and counters read from `snapshot()` at scrape time.

    `specs`: metric name -> (kind "gauge" | "counter", help, key in the snapshot dict).
    """

    def __init__(self, snapshot: Callable[[], Mapping[str, float]],
                 specs: Mapping[str, tuple[str, str, str]]) -> None:
        self._snapshot, self._specs = snapshot, specs

    def collect(self) -> Iterable:
        snap = self._snapshot()
        for name, (kind, doc, key) in self._specs.items():
            if key not in snap:
                continue
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, doc, value=float(snap[key]))

    def describe(self) -> Iterable:
        return []  # unknown until scraped; keeps registration from calling snapshot()


class AioRpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC of a grpc.aio server by method and final status code."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.rpcs = Counter(f"{prefix}_rpcs", "RPCs by method and final status code",
                            ["method", "code"], registry=registry)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc.") or handler.request_streaming:
            return handler  # pdmesh has no client-streaming RPCs
        method = details.method.rsplit("/", 1)[-1]
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            self._unary(handler.unary_unary, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _unary(self, behavior, method: str):
        async def run(request, context):
            try:
                out = await behavior(request, context)
            except BaseException as e:
                self._count(method, context, e)
                raise
            self._count(method, context, None)
            return out
        return run

    def _stream(self, behavior, method: str):
        async def run(request, context):
            try:
                async for msg in behavior(request, context):
                    yield msg
            except BaseException as e:
                self._count(method, context, e)
                raise
            self._count(method, context, None)
        return run

    def _count(self, method: str, context, error: BaseException | None) -> None:
        code = context.code()  # set by context.abort / set_code
        if code is not None:
            name = code.name if hasattr(code, "name") else str(code)
        elif isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            name = "CANCELLED"
        else:
            name = "UNKNOWN" if error is not None else "OK"
        self.rpcs.labels(method, name).inc()


def serve_http(registry: CollectorRegistry, host: str, port: int) -> int:
    """Serve `registry` at http://host:port/metrics on a daemon thread; the bound port."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_address[1]


def render_gateway(registry: CollectorRegistry) -> bytes:
    """The gateway's /metrics: its own registry, or, when it is one of several gateway
    processes (PROMETHEUS_MULTIPROC_DIR set), the sum over all of them."""
    import os

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return render(registry)
    from prometheus_client import multiprocess

    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged)
    return generate_latest(merged)


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition of `registry` (for a /metrics route of our own)."""
    return generate_latest(registry)
