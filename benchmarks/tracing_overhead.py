"""What tracing costs: off (the default) against on, side by side in one run.

    .venv/bin/python benchmarks/tracing_overhead.py [--concurrency 1 4] [--requests-per-client 6]

1. In process: the gateway's per-request telemetry calls (RequestObserver: span + metrics,
   the REST entry span, the tokenize span, the workers' after-the-fact spans) timed with
   tracing off, then on (spans to a JSON-lines file), in microseconds per request.
2. End to end: `pdmesh serve` 1P1D three times — tracing off, on (`--trace-file`), off
   again — the same streaming chat load each time; mean TTFT / TPOT / e2e. The two "off"
   runs bound the machine's noise; "on" is compared against it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mesh_bench import measure_deployment  # noqa: E402


def per_request_us(n: int = 20000) -> float:
    """Microseconds of telemetry work per request (32 token messages) at the gateway
    and workers, as the current tracing state makes it."""
    from pdmesh.services.gateway.observe import RequestObserver
    from pdmesh.services.gateway.pool import Route
    from pdmesh.services.gateway.routing import Worker
    from pdmesh.telemetry import tracing
    from pdmesh.telemetry.metrics import GatewayMetrics
    from pdmesh.v1 import common_pb2 as cpb

    metrics, sp = GatewayMetrics(), cpb.SamplingParams(max_tokens=32, temperature=0)
    route = Route(Worker("p", "PREFILL", "p:1", "m"), Worker("d", "DECODE", "d:1", "m"), "why")
    t0 = time.perf_counter()
    for _ in range(n):
        with tracing.http_server_span("POST", "/v1/chat/completions", {}):
            obs = RequestObserver(metrics, "ChatCompletions", "chat", "m")
            with tracing.attached(obs.context), tracing.span("tokenize"):
                pass
            obs.request(60, sp)
            obs.routed(route, 1, "pd", route.why)
            for _ in range(32):
                obs.tokens(1)
            tracing.record_span("prefill.compute", 1.0, 1.1)  # what a worker adds
            obs.finish("OK", cpb.FINISH_REASON_LENGTH, None)
    return (time.perf_counter() - t0) / n * 1e6


def in_process() -> tuple[float, float]:
    from pdmesh.config import TelemetryConfig
    from pdmesh.telemetry import tracing

    off = per_request_us()
    path = os.path.join(tempfile.mkdtemp(), "spans.jsonl")
    tracing.setup(TelemetryConfig(trace_file=path), "bench")
    on = per_request_us(300)  # fewer: the batch queue (2048 spans) must not overflow
    tracing.shutdown()
    return off, on


def end_to_end(args) -> list[tuple[str, int, float, float, float]]:
    rows = []
    trace_file = os.path.join(tempfile.mkdtemp(), "spans.jsonl")
    for name, extra in (("off", []), ("on", ["--trace-file", trace_file]), ("off (again)", [])):
        for c, res in measure_deployment(["--prefill", "1", "--decode", "1", *extra],
                                         args.concurrency, args.requests_per_client,
                                         args.max_tokens):
            ttft, tpot = [r[0] for r in res], [r[1] for r in res]
            e2e = [t + p * (n - 1) for t, p, n in res]
            rows.append((name, c, statistics.mean(ttft), statistics.mean(tpot),
                         statistics.mean(e2e)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--requests-per-client", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    off, on = in_process()
    print(f"telemetry work per request (in process): tracing off {off:.1f} us, "
          f"tracing on {on:.1f} us")
    rows = end_to_end(args)
    print("| tracing | concurrency | mean TTFT s | mean TPOT s | mean e2e s |")
    print("|---|---|---|---|---|")
    for name, c, ttft, tpot, e2e in rows:
        print(f"| {name} | {c} | {ttft:.3f} | {tpot:.4f} | {e2e:.3f} |")


if __name__ == "__main__":
    main()
