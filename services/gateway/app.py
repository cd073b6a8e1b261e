"""One gateway process: the Watch-fed worker pool, the grpc.aio Gateway server and the
REST transcoder (aiohttp), all on one asyncio loop."""
from __future__ import annotations

import asyncio
import signal
from typing import Callable

import orjson
from aiohttp import web

from pdmesh import tls
from pdmesh.aio import freeze_startup_objects
from pdmesh.config import GatewayConfig
from pdmesh.telemetry.metrics import CONTENT_TYPE, GatewayMetrics, render_gateway
from pdmesh.v1 import gateway_pb2 as gpb
from pdmesh.services.gateway.admission import Admission
from pdmesh.services.gateway.breaker import (BreakerConfig, Breakers, ResilienceMetrics,
                                             RetryPolicy)
from pdmesh.services.gateway import openai_api as oa
from pdmesh.services.gateway.dispatch import Dispatcher, load_model_info
from pdmesh.services.gateway.openapi import openapi_document
from pdmesh.services.gateway.pd_metrics import PdModeMetrics
from pdmesh.services.gateway.pd_mode import PdModeDecider
from pdmesh.services.gateway.pool import WorkerPool
from pdmesh.services.gateway.server import GatewayServicer, create_server
from pdmesh.services.gateway.transcoder import build_app


def run(config: GatewayConfig, on_ready: Callable[[int, int], None]) -> None:
    """`serve` on uvloop when it is installed, else on asyncio's loop. On uvloop the
    loop thread spends ~10% less CPU per streamed token (49 -> 44 µs at 256 streams) and
    the added latency p50 drops 1.3 -> 0.9 ms (benchmarks/results/
    2026-11-29-gateway-ceiling-cpu.md)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config, on_ready))
        return
    uvloop.run(serve(config, on_ready))


async def serve(config: GatewayConfig, on_ready: Callable[[int, int], None],
                stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (or SIGINT/SIGTERM), then drain for shutdown_grace_s.
    `on_ready(rest_port, grpc_port)` is called once both servers listen."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    info = load_model_info(config.model, config.served_model_name, config.max_model_len)
    oa.warm_up(info, config)  # before this process can be given a connection
    metrics = GatewayMetrics()
    resilience = ResilienceMetrics(metrics.registry)
    breakers = Breakers(BreakerConfig(config.breaker_failure_threshold,
                                      config.breaker_success_threshold, config.breaker_open_s),
                        resilience)
    # per-request disaggregation (--pd-mode); reads --pd-mode-profile (ValueError if bad)
    pd_mode = PdModeDecider.from_config(config, PdModeMetrics(metrics.registry))
    pool = WorkerPool(config.registry, config.mode, config.prefill_policy,
                      config.decode_policy, breakers=breakers, config=config, pd_mode=pd_mode)
    pool.start()
    admission = Admission(config.max_inflight, config.queue_limit, config.queue_timeout_s,
                          config.retry_after_s, metrics)
    retry = RetryPolicy(config.retry_max_attempts, config.retry_backoff_base_s,
                        config.retry_backoff_cap_s)
    dispatcher = Dispatcher(pool, info, admission, retry, resilience)
    servicer = GatewayServicer(dispatcher, config.api_key, metrics, config)
    grpc_server, grpc_port = await create_server(f"{config.host}:{config.grpc_port}", servicer)
    app = build_app(servicer, [gpb.DESCRIPTOR.services_by_name["Gateway"]],
                    config.max_body_bytes)
    # the OpenAPI document of the annotated RPCs, generated from the descriptors
    api_doc = orjson.dumps(openapi_document([gpb.DESCRIPTOR.services_by_name["Gateway"]],
                                            api_key=bool(config.api_key)))
    app.router.add_get("/openapi.json", lambda _: web.Response(
        body=api_doc, content_type="application/json"))
    app.router.add_get("/metrics", lambda _: web.Response(
        body=render_gateway(metrics.registry), headers={"Content-Type": CONTENT_TYPE}))
    # handler_cancellation: a client that disconnects cancels its handler, and with it
    # both legs of its request, even while no token is being written
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    material = tls.current()  # --tls-cert/--tls-key: REST over https too (no client cert)
    site = web.TCPSite(runner, config.host, config.port, reuse_port=config.reuse_port or None,
                       ssl_context=material and tls.ssl_server_context(material))
    await site.start()
    rest_port = site._server.sockets[0].getsockname()[1]
    await dispatcher.warm_up()
    freeze_startup_objects()
    on_ready(rest_port, grpc_port)
    try:
        await stop.wait()
    finally:
        # stop accepting, let in-flight requests finish for the grace period
        await asyncio.gather(runner.shutdown(), grpc_server.stop(config.shutdown_grace_s))
        await runner.cleanup()
        pool.close()
        await dispatcher.close()
