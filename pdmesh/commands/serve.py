"""`pdmesh serve`: the whole mesh on one machine — registry, N prefill, M decode (and K
colocated) workers, and the gateway — each its own process, started in that order.

Every child is one of the single-service commands (`pdmesh registry|prefill|decode|
gateway`), so what runs here is exactly what runs alone on a multi-host deployment.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from pdmesh.commands import telemetry_flags

_LISTENING = re.compile(r"listening on (\S+)")
_METRICS = re.compile(r"metrics (http://\S+?/metrics)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), a HF folder or a .gguf file")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (default 1)")
    p.add_argument("--decode", type=int, default=1, help="decode workers (default 1)")
    p.add_argument("--colocated", type=int, default=0,
                   help="colocated workers (prefill + decode in one engine, no transfer)")
    p.add_argument("--host", default="127.0.0.1", help="interface for every service")
    p.add_argument("--port", type=int, default=8000, help="gateway REST port (OpenAI API)")
    p.add_argument("--grpc-port", type=int, default=50051, help="gateway gRPC port")
    p.add_argument("--registry-port", type=int, default=0, help="registry port (0 = free)")
    p.add_argument("--heartbeat-interval", type=float, default=None,
                   help="seconds between worker heartbeats (registry default 5)")
    p.add_argument("--heartbeat-max-failure", type=int, default=None,
                   help="missed heartbeats before a worker is expired (registry default 2)")
    p.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                   help="extra flag passed to every prefill/decode worker, e.g. "
                        "--worker-arg=--page-size=16 (repeatable)")
    p.add_argument("--gateway-arg", action="append", default=[], metavar="ARG",
                   help="extra flag passed to the gateway (repeatable)")
    p.add_argument("--ready-timeout", type=float, default=300.0,
                   help="seconds to wait for each service to report it is listening")
    telemetry_flags.add_arguments(p, metrics_port=False)  # passed on to every service


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    address: str
    metrics: str = ""  # its Prometheus endpoint URL


def start(name: str, argv: list[str], env: dict[str, str], timeout: float) -> Child:
    """Start `pdmesh <argv>` and wait for its "listening on HOST:PORT" line."""
    proc = subprocess.Popen([sys.executable, "-m", "pdmesh.cli", *argv], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=None, bufsize=1)
    found: list[str] = []
    metrics: list[str] = []
    ready = threading.Event()

    def pump() -> None:  # echo the child's stdout, prefixed; note its addresses
        for line in proc.stdout:
            print(f"[{name}] {line}", end="", flush=True)
            m = _LISTENING.search(line)
            if m and (mm := _METRICS.search(line)) and not metrics:
                metrics.append(mm.group(1))
            if m and not found:
                found.append(m.group(1))
                ready.set()
        ready.set()
    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(timeout) or not found:
        proc.kill()
        raise RuntimeError(f"{name} did not start (exit code {proc.poll()}); see its output above")
    return Child(name, proc, found[0], metrics[0] if metrics else "")


def _worker_env(num_workers: int) -> dict[str, str]:
    env = dict(os.environ)
    # several engines share the cores: one OpenMP pool each would oversubscribe them
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, num_workers))))
    return env


def launch(args: argparse.Namespace) -> list[Child]:
    """Start registry, workers, then the gateway; returns them in start order."""
    timeout, children = args.ready_timeout, []
    tel = telemetry_flags.forward(args)
    reg = ["registry", "--host", args.host, "--port", str(args.registry_port), *tel]
    if args.heartbeat_interval is not None:
        reg += ["--heartbeat-interval", str(args.heartbeat_interval)]
    if args.heartbeat_max_failure is not None:
        reg += ["--heartbeat-max-failure", str(args.heartbeat_max_failure)]
    children.append(start("registry", reg, dict(os.environ), timeout))
    common = ["--registry", children[0].address, "--model", args.model, "--host", args.host,
              "--port", "0", *tel, *args.worker_arg]
    roles = ([("prefill", ["prefill"])] * args.prefill + [("decode", ["decode"])] * args.decode
             + [("colocated", ["decode", "--role", "colocated"])] * args.colocated)
    env = _worker_env(len(roles))
    for i, (name, argv) in enumerate(roles):
        children.append(start(f"{name}-{i}", argv + common, env, timeout))
    children.append(start("gateway", ["gateway", "--registry", children[0].address, "--model",
                                      args.model, "--host", args.host, "--port", str(args.port),
                                      "--grpc-port", str(args.grpc_port), *tel,
                                      *args.gateway_arg],
                          dict(os.environ), timeout))
    return children


def shutdown(children: list[Child], grace: float = 30.0) -> None:
    """SIGTERM in reverse start order (gateway first: it stops taking requests), then kill."""
    for c in reversed(children):
        if c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
            try:
                c.proc.wait(grace)
            except subprocess.TimeoutExpired:
                c.proc.kill()


def run(args: argparse.Namespace) -> int:
    if args.prefill + args.decode + args.colocated == 0 or (args.prefill > 0) != (args.decode > 0):
        print("pdmesh serve: error: give --prefill N and --decode M (both >= 1), and/or "
              "--colocated K", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    children: list[Child] = []
    try:
        children = launch(args)
        print("pdmesh serve: ready — " + ", ".join(f"{c.name} {c.address}" for c in children),
              flush=True)
        print("pdmesh serve: metrics — " + ", ".join(f"{c.name} {c.metrics}" for c in children
                                                     if c.metrics), flush=True)
        while not stop.is_set():
            dead = [c for c in children if c.proc.poll() is not None]
            if dead:
                print(f"pdmesh serve: {dead[0].name} exited ({dead[0].proc.returncode}); "
                      "stopping the mesh", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    except RuntimeError as e:
        print(f"pdmesh serve: error: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown(children)
