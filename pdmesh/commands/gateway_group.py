"""`pdmesh gateway --processes N`: N gateway processes sharing the REST and gRPC ports.

One gateway process streams from one event-loop thread (~45-60 µs of CPU per streamed
token), so a host's cores go unused past one. Here the parent only supervises: it picks
the ports, starts N `pdmesh gateway --processes 1 --reuse-port` children (SO_REUSEPORT:
the kernel spreads connections over them), each following the registry and routing on
its own, and prints one `gateway listening on ...` line once all listen. /metrics sums
every process (prometheus_client's multiprocess mode in a temporary folder). A child that
dies stops the group; SIGTERM/SIGINT drains every child; children die with the parent.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import threading

from pdmesh.commands import serve
from pdmesh.config import GatewayConfig


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_group(config: GatewayConfig, ready_timeout: float = 300.0) -> int:
    """Start config.processes children on shared ports and supervise them."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
    rest, grpc_port = config.port or _free_port(host), config.grpc_port or _free_port(host)
    metrics_dir = tempfile.mkdtemp(prefix="pdmesh-gateway-metrics-")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    argv = [*sys.argv[1:], "--port", str(rest), "--grpc-port", str(grpc_port),
            "--processes", "1", "--reuse-port"]
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    children: list[serve.Child] = []
    try:
        for i in range(config.processes):
            children.append(serve.spawn(f"gateway-{i}", argv, env))
        for child in children:
            serve.wait_ready(child, ready_timeout, stop)
        print(f"gateway listening on {config.host}:{rest} (REST) and {config.host}:"
              f"{grpc_port} (gRPC), metrics http://{config.host}:{rest}/metrics, "
              f"{config.processes} processes", flush=True)
        while not stop.wait(0.5):
            if dead := [c for c in children if c.proc.poll() is not None]:
                print(f"pdmesh gateway: {dead[0].name} exited ({dead[0].proc.returncode}); "
                      "stopping the others", file=sys.stderr)
                return 1
        return 0
    except serve.StartError as e:
        print(f"pdmesh gateway: {e}", file=sys.stderr)
        return 1
    finally:
        serve.shutdown(children, grace=config.shutdown_grace_s + 10)
        shutil.rmtree(metrics_dir, ignore_errors=True)
