"""`pdmesh serve`: the whole mesh on one machine — registry, N prefill, M decode (and K
colocated) workers, and the gateway — each its own process, started in that order.

Every child is one of the single-service commands (`pdmesh registry|prefill|decode|
gateway`), so what runs here is exactly what runs alone on a multi-host deployment.

Lifecycle: nothing starts unless the gateway's (and a fixed registry's) ports can be bound
and, with prefill/decode workers, the Mooncake transfer engine imports. A start that fails
later stops every child already started (exit 1, one line). Each child gets SIGTERM from
the kernel when this process dies (PR_SET_PDEATHSIG), so even `kill -9` of serve leaves
no service behind.

The mesh is closed by default: every child gets one cluster token (--cluster-token-file,
PDMESH_CLUSTER_TOKEN, else a random one minted here) in its environment, never in argv.
With --tls-dir (or --tls-cert/--tls-key/--tls-ca) every child gets the same TLS files as
flags: the whole mesh, gateway included, runs on TLS (mTLS between services with a CA).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from pdmesh.commands import auth_flags, telemetry_flags
from pdmesh.commands.placement import (ROLE_ARGV, _tp, gpu_assignment, worker_roles,
                                       worker_threads)

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
    from pdmesh.commands.gateway import add_admission_arguments, add_routing_arguments
    add_admission_arguments(p, to_gateway=True)  # --max-inflight etc., as gateway flags
    add_routing_arguments(p, to_gateway=True)  # --prefill-policy etc., as gateway flags
    p.add_argument("--registry-port", type=int, default=0, help="registry port (0 = free)")
    p.add_argument("--heartbeat-interval", type=float, default=None,
                   help="seconds between worker heartbeats (registry default 5)")
    p.add_argument("--heartbeat-max-failure", type=int, default=None,
                   help="missed heartbeats before a worker is expired (registry default 2)")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor-parallel ranks per worker (default 1); per role below")
    p.add_argument("--prefill-tp", type=int, default=None, metavar="N",
                   help="tensor-parallel ranks per prefill worker (default --tp)")
    p.add_argument("--decode-tp", type=int, default=None, metavar="N",
                   help="tensor-parallel ranks per decode worker (default --tp)")
    p.add_argument("--gpus", default=None, metavar="LIST",
                   help="GPU ids to spread the workers over (e.g. 0,1): each worker gets the "
                        "next TP-size ids as its CUDA_VISIBLE_DEVICES, wrapping around (so "
                        "workers share GPUs when there are fewer); default: every worker "
                        "sees every GPU and uses the first")
    p.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                   help="extra flag passed to every prefill/decode worker, e.g. "
                        "--worker-arg=--page-size=16 (repeatable)")
    p.add_argument("--gateway-arg", action="append", default=[], metavar="ARG",
                   help="extra flag passed to the gateway (repeatable)")
    p.add_argument("--chaos", action="store_true",
                   help="start the registry and every worker with --chaos (pdmesh.v1.Chaos: "
                        "fault injection by RPC; tests and benchmarks/chaos.py only)")
    p.add_argument("--ready-timeout", type=float, default=300.0,
                   help="seconds to wait for each service to report it is listening")
    auth_flags.add_arguments(p)  # the children get the token by environment
    telemetry_flags.add_arguments(p, metrics_port=False)  # passed on to every service


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    ready: threading.Event
    address: str = ""
    metrics: str = ""  # its Prometheus endpoint URL
    argv: tuple[str, ...] = ()  # how to start it again (supervise)
    env: dict[str, str] | None = None
    line: str = ""  # its "listening on" line


class StartError(Exception):
    """A service did not start (or a stop was asked for meanwhile); str() is one line."""


_PR_SET_PDEATHSIG = 1


def _prctl():
    """libc's prctl, looked up here in the parent: the child, between fork and exec, only
    calls it (loading a library there could deadlock on a lock another thread held)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        return None


def _die_with_parent(prctl, parent: int):
    """preexec_fn: SIGTERM this child when its parent dies (survives exec), and at once
    if the parent already died between fork and here."""
    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def spawn(name: str, argv: list[str], env: dict[str, str]) -> Child:
    """Start `pdmesh <argv>`; its stdout is echoed prefixed, and `ready` is set at its
    "listening on HOST:PORT" line (or when its output ends)."""
    prctl = _prctl()
    proc = subprocess.Popen([sys.executable, "-m", "pdmesh.cli", *argv], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=None, bufsize=1,
                            preexec_fn=prctl and _die_with_parent(prctl, os.getpid()))
    child = Child(name, proc, threading.Event(), argv=tuple(argv), env=env)

    def pump() -> None:  # echo the child's stdout, prefixed; note its addresses
        for line in proc.stdout:
            print(f"[{name}] {line}", end="", flush=True)
            # "[gateway-0] ... listening on": a line the child echoes from a child of its
            # own (`gateway --processes N`): the child is ready at its own line only
            m = None if line.startswith("[") else _LISTENING.search(line)
            if m and not child.ready.is_set():
                mm = _METRICS.search(line)
                child.address, child.metrics = m.group(1), mm.group(1) if mm else ""
                child.line = line
                child.ready.set()
        child.ready.set()
    threading.Thread(target=pump, daemon=True).start()
    return child


def wait_ready(child: Child, timeout: float, stop: threading.Event,
               said: float | None = None) -> None:
    """Until `child` says it is listening; StartError if it exits, times out or a stop
    was asked for first. `said`: the timeout to name in the error (default `timeout`)."""
    deadline = time.monotonic() + timeout
    while not child.ready.wait(0.1):
        if stop.is_set():
            raise StartError(f"stopped while {child.name} was starting")
        if time.monotonic() > deadline:
            raise StartError(f"{child.name} did not start within {said or timeout:g} s")
    if not child.address:  # its output ended: it exited (or is about to)
        try:
            code = child.proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        raise StartError(f"{child.name} did not start (exit code {code}); see its output above")


def mesh_token(args: argparse.Namespace) -> str:
    """The children's cluster token: given (file, env), else a fresh random one."""
    return auth_flags.config_from_args(args).cluster_token or secrets.token_urlsafe(32)


def _env(token: str) -> dict[str, str]:
    """A child's environment: ours, plus the token (environment, not argv: `ps` shows argv)."""
    return dict(os.environ, PDMESH_CLUSTER_TOKEN=token)


def _worker_env(roles: list[str], token: str) -> list[dict[str, str]]:
    """Each worker's environment (`roles`: "prefill" | "decode" | "colocated" each)."""
    env = _env(token)
    return [dict(env, **worker_threads(roles, i, os.cpu_count() or 1, env))
            for i in range(len(roles))]


class Supervisor:
    """Restarts children that exit while the mesh runs, each with its own backoff
    (BACKOFF_S doubling up to BACKOFF_MAX_S; back to BACKOFF_S once a child stayed up
    STABLE_S), while the others keep serving. The registry and the gateway come back on
    the ports they had (workers re-register with the new registry within a heartbeat
    interval; the gateway routes from its last view meanwhile); a worker gets a new port
    and registers anew. Called from the main thread only: PR_SET_PDEATHSIG fires when the
    *thread* that forked a child ends, so every child is forked by the main thread."""

    BACKOFF_S, BACKOFF_MAX_S, STABLE_S = 0.5, 30.0, 30.0

    def __init__(self, children: list[Child], clock=time.monotonic) -> None:
        self.children, self._clock = children, clock
        self._due: dict[str, float] = {}  # name -> when to start it again
        self._backoff: dict[str, float] = {}
        self._started: dict[str, float] = {c.name: clock() for c in children}
        self._waiting: set[str] = set()  # restarted, not yet listening
        self.restarts: dict[str, int] = {}

    def tick(self) -> None:
        now = self._clock()
        for i, c in enumerate(self.children):
            if c.name in self._waiting and c.ready.is_set():
                self._waiting.discard(c.name)
                if c.address:
                    print(f"pdmesh serve: {c.name} restarted, listening on {c.address}",
                          file=sys.stderr, flush=True)
            if c.proc.poll() is None:
                if now - self._started[c.name] > self.STABLE_S:
                    self._backoff.pop(c.name, None)
                continue
            if c.name not in self._due:
                wait = self._backoff.get(c.name, 0.0)
                self._backoff[c.name] = min(self.BACKOFF_MAX_S, max(self.BACKOFF_S, 2 * wait))
                self._due[c.name] = now + wait
                print(f"pdmesh serve: {c.name} exited ({c.proc.returncode}); restarting it "
                      f"in {wait:.1f} s, the mesh goes on", file=sys.stderr, flush=True)
            elif now >= self._due[c.name]:
                del self._due[c.name]
                self._waiting.discard(c.name)
                self.children[i] = spawn(c.name, restart_argv(c), c.env)
                self._started[c.name] = now
                self._waiting.add(c.name)
                self.restarts[c.name] = self.restarts.get(c.name, 0) + 1


def restart_argv(c: Child) -> list[str]:
    """`c`'s argv with the ports it was given as 0 pinned to the ones it had: a restarted
    registry must be where the workers look for it, a restarted gateway where clients do."""
    argv = list(c.argv)
    ports = re.findall(r"listening on \S+?:(\d+)(?:.*?\S+?:(\d+) \(gRPC\))?", c.line)

    def pin(flag: str, port: str | None) -> None:
        if port and flag in argv:
            argv[argv.index(flag) + 1] = port
    if ports and c.name in ("registry", "gateway"):
        pin("--port", ports[0][0])
        pin("--grpc-port", ports[0][1])
    return argv


def launch(args: argparse.Namespace, children: list[Child], stop: threading.Event) -> None:
    """Start the registry, the workers (together), then the gateway, appending each to
    `children` as soon as it is spawned (so the caller can stop it whatever fails next)."""
    def start(name: str, argv: list[str], env: dict[str, str]) -> Child:
        children.append(spawn(name, argv, env))
        wait_ready(children[-1], args.ready_timeout, stop)
        return children[-1]

    tel, token = telemetry_flags.forward(args), mesh_token(args)
    tel += auth_flags.forward(auth_flags.config_from_args(args))  # TLS files: every child
    reg = ["registry", "--host", args.host, "--port", str(args.registry_port), *tel]
    if args.heartbeat_interval is not None:
        reg += ["--heartbeat-interval", str(args.heartbeat_interval)]
    if args.heartbeat_max_failure is not None:
        reg += ["--heartbeat-max-failure", str(args.heartbeat_max_failure)]
    registry = start("registry", reg, _env(token)).address
    common = ["--registry", registry, "--model", args.model, "--host", args.host,
              "--port", "0", *tel, *args.worker_arg]
    roles = worker_roles(args)
    envs = _worker_env([name for name, _ in roles], token)
    gpus = gpu_assignment(args.gpus, [tp for _, tp in roles])
    # the workers start together (a mesh is ready in one worker's start, not the sum of
    # them); their caches (weights, kernel tuning, the CPU kernel build) are safe for that
    deadline, workers = time.monotonic() + args.ready_timeout, []
    for i, ((name, tp), env, ids) in enumerate(zip(roles, envs, gpus)):
        workers.append(spawn(f"{name}-{i}", ROLE_ARGV[name] + _tp(tp) + common,
                             env if ids is None else dict(env, CUDA_VISIBLE_DEVICES=ids)))
        children.append(workers[-1])
    for w in workers:
        wait_ready(w, max(0.0, deadline - time.monotonic()), stop, args.ready_timeout)
    start("gateway", ["gateway", "--registry", registry, "--model", args.model, "--host",
                      args.host, "--port", str(args.port), "--grpc-port", str(args.grpc_port),
                      *tel, *args.gateway_arg], _env(token))


def share_settings(args: argparse.Namespace) -> None:
    """Settings every child reads from its environment (ours, plus the token): the lease
    (the gateway keeps workers a registry resync missed for that long) and --chaos."""
    if args.heartbeat_interval is not None:
        os.environ["PDMESH_HEARTBEAT_INTERVAL"] = str(args.heartbeat_interval)
    if args.heartbeat_max_failure is not None:
        os.environ["PDMESH_HEARTBEAT_MAX_FAILURE"] = str(args.heartbeat_max_failure)
    if getattr(args, "chaos", False):
        os.environ["PDMESH_CHAOS"] = "1"


def shutdown(children: list[Child], grace: float = 30.0) -> None:
    """SIGTERM in reverse start order (gateway first: it stops taking requests), then kill."""
    for c in reversed(children):
        if c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
            try:
                c.proc.wait(grace)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()


def port_problem(host: str, port: int) -> str | None:
    """None when a server could bind (host, port) now (0: any free port), else why not."""
    if port == 0:
        return None
    try:
        addrs = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"cannot resolve {host!r} ({e.strerror})"
    for family, kind, proto, _, addr in addrs:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
            try:
                s.bind(addr)
            except OSError as e:
                return e.strerror or str(e)
    return None


def preflight(args: argparse.Namespace) -> tuple[int, str] | None:
    """(exit code, the one line to print) when the mesh cannot start here; checked before
    any child starts."""
    if args.prefill + args.decode + args.colocated == 0 or (args.prefill > 0) != (args.decode > 0):
        return 2, ("pdmesh serve: error: give --prefill N and --decode M (both >= 1), and/or "
                   "--colocated K")
    try:
        auth_flags.config_from_args(args)
    except ValueError as e:  # an unreadable token file or a malformed token
        return 2, f"pdmesh serve: error: {e}"
    try:
        gpu_assignment(args.gpus, [tp for _, tp in worker_roles(args)])
    except ValueError as e:
        return 2, f"pdmesh serve: error: {e}"
    if args.prefill + args.decode:  # colocated workers move no KV: no Mooncake needed
        from pdmesh.transfer import MooncakeUnavailable, check_transport

        try:
            check_transport("mooncake")
        except MooncakeUnavailable as e:
            return 2, f"pdmesh: {e}"  # as `pdmesh prefill|decode` say it
    for what, flag, port in (("gateway REST", "--port", args.port),
                             ("gateway gRPC", "--grpc-port", args.grpc_port),
                             ("registry", "--registry-port", args.registry_port)):
        if why := port_problem(args.host, port):
            return 1, (f"pdmesh serve: error: the {what} port {args.host}:{port} ({flag}) "
                       f"is not free: {why}")
    return None


def run(args: argparse.Namespace) -> int:
    if problem := preflight(args):
        print(problem[1], file=sys.stderr)
        return problem[0]
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    children: list[Child] = []
    share_settings(args)
    grace = 30.0  # for each child to stop; short when the mesh never came up
    try:
        launch(args, children, stop)
        print("pdmesh serve: ready — " + ", ".join(f"{c.name} {c.address}" for c in children),
              flush=True)
        print("pdmesh serve: metrics — " + ", ".join(f"{c.name} {c.metrics}" for c in children
                                                     if c.metrics), flush=True)
        supervisor = Supervisor(children)
        while not stop.is_set():
            supervisor.tick()
            stop.wait(0.2)
        return 0
    except StartError as e:
        print(f"pdmesh serve: error: {e}", file=sys.stderr)
        grace = 5.0
        return 1
    finally:
        shutdown(children, grace)
