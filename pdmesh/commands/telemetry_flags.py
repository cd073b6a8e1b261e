"""Telemetry flags every service command takes (traces, metrics, summary logs)."""
from __future__ import annotations

import argparse
import logging

from pdmesh.config import TelemetryConfig, telemetry_config_from_env


def add_arguments(p: argparse.ArgumentParser, metrics_port: bool = True,
                  summaries: bool = False) -> None:
    """--otlp-endpoint, --otlp-protocol, --trace-file, --trace-sample-ratio, and (for
    services with their own metrics port) --metrics-port, (workers) --log-interval."""
    g = p.add_argument_group("telemetry")
    g.add_argument("--otlp-endpoint", default=None,
                   help="export traces by OTLP to this collector, e.g. http://localhost:4317 "
                        "(env OTEL_EXPORTER_OTLP_ENDPOINT)")
    g.add_argument("--otlp-protocol", choices=("grpc", "http/protobuf"), default=None,
                   help="OTLP transport (default grpc; env OTEL_EXPORTER_OTLP_PROTOCOL)")
    g.add_argument("--trace-file", default=None,
                   help="append traces to this file as OTLP/JSON lines; read it with "
                        "`pdmesh trace show FILE` (env PDMESH_TRACE_FILE)")
    g.add_argument("--trace-sample-ratio", type=float, default=None,
                   help="fraction of requests traced, 0..1 (default 1; env "
                        "PDMESH_TRACE_SAMPLE_RATIO); traces are off unless an OTLP endpoint "
                        "or a trace file is given")
    if metrics_port:
        g.add_argument("--metrics-port", type=int, default=None,
                       help="port of the Prometheus /metrics endpoint (default 0 = a free "
                            "port, printed at start; -1 = off; env PDMESH_METRICS_PORT)")
    if summaries:
        g.add_argument("--log-interval", type=float, default=None,
                       help="seconds between summary log lines (running/queued requests, KV "
                            "usage, throughput; default 10, 0 = off; env PDMESH_LOG_INTERVAL)")


def config_from_args(args: argparse.Namespace) -> TelemetryConfig:
    """Defaults, then env, then flags (flags win). ValueError on bad values."""
    flags = {"otlp_endpoint": args.otlp_endpoint, "otlp_protocol": args.otlp_protocol,
             "trace_file": args.trace_file, "trace_sample_ratio": args.trace_sample_ratio,
             "metrics_port": getattr(args, "metrics_port", None),
             "log_interval_s": getattr(args, "log_interval", None)}
    return telemetry_config_from_env(TelemetryConfig()).replace(
        **{k: v for k, v in flags.items() if v is not None})


def setup(config: TelemetryConfig, service: str) -> None:
    """Logging at INFO (summary lines) and tracing as `config` says, for `service`."""
    from pdmesh.telemetry import tracing

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tracing.setup(config, service)


def forward(args: argparse.Namespace) -> list[str]:
    """The tracing flags as given, to pass on to child services (`pdmesh serve`)."""
    out = []
    for flag, value in (("--otlp-endpoint", args.otlp_endpoint),
                        ("--otlp-protocol", args.otlp_protocol),
                        ("--trace-file", args.trace_file),
                        ("--trace-sample-ratio", args.trace_sample_ratio)):
        if value is not None:
            out += [flag, str(value)]
    return out
