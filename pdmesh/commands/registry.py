"""`pdmesh registry`: run the bootstrap registry alone (multi-host deployments).

Prints `registry listening on HOST:PORT` once serving (with --port 0, the free port
it picked), then runs until SIGINT or SIGTERM and stops gracefully.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from pdmesh.commands import auth_flags, telemetry_flags
from pdmesh.config import RegistryConfig, registry_config_from_env


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1; 0.0.0.0 for other hosts' workers)")
    p.add_argument("--port", type=int, default=50050,
                   help="gRPC port (default 50050; 0 = a free port, printed at start)")
    p.add_argument("--heartbeat-interval", type=float, default=None,
                   help="seconds between worker heartbeats (default 5, env "
                        "PDMESH_HEARTBEAT_INTERVAL)")
    p.add_argument("--heartbeat-max-failure", type=int, default=None,
                   help="missed heartbeats before a worker is expired (default 2, env "
                        "PDMESH_HEARTBEAT_MAX_FAILURE)")
    p.add_argument("--chaos", action="store_true", default=None,
                   help="serve pdmesh.v1.Chaos (stall/drop heartbeats, delay/fail RPCs); "
                        "tests only (env PDMESH_CHAOS=1)")
    auth_flags.add_arguments(p)
    telemetry_flags.add_arguments(p, metrics_port=True)


def config_from_args(args: argparse.Namespace) -> RegistryConfig:
    """Defaults, then PDMESH_* env, then flags (flags win)."""
    config = registry_config_from_env(RegistryConfig())
    changes = {name: value for name, value in (
        ("heartbeat_interval", args.heartbeat_interval),
        ("heartbeat_max_failure", args.heartbeat_max_failure),
        ("chaos", getattr(args, "chaos", None))) if value is not None}
    return config.replace(**changes)


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        telemetry = telemetry_flags.config_from_args(args)
        auth = auth_flags.config_from_args(args)
    except ValueError as e:
        print(f"pdmesh registry: {e}", file=sys.stderr)
        return 2
    telemetry_flags.setup(telemetry, "pdmesh-registry")
    auth_flags.setup(auth)
    from pdmesh import aio

    return aio.run(_serve(args, config, telemetry))


async def _serve(args: argparse.Namespace, config, telemetry) -> int:
    from pdmesh.services.bootstrap.server import serve
    from pdmesh.telemetry.metrics import serve_http

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    server = await serve(f"{args.host}:{args.port}", config)
    metrics = ""
    if telemetry.metrics_port >= 0:
        mport = serve_http(server.metrics, args.host, telemetry.metrics_port)
        metrics = f", metrics http://{args.host}:{mport}/metrics"
    print(f"registry listening on {args.host}:{server.port} (heartbeat "
          f"{config.heartbeat_interval}s x {config.heartbeat_max_failure}{metrics})", flush=True)
    await stop.wait()
    await server.stop()
    print("registry stopped", flush=True)
    return 0
