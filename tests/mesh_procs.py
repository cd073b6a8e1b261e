"""Start pdmesh services as real processes for end-to-end tests.

    proc, addr = start_registry(heartbeat_interval=0.3, heartbeat_max_failure=3)
    p, p_addr = start_prefill(addr, "--kv-cache-bytes", str(48 << 20))
    ...
    terminate(p)   # SIGTERM, then SIGKILL after a grace period
    kill9(p)       # no goodbye (liveness tests)

Each helper runs `python -m pdmesh.cli <command> --port 0 ...`, waits for its
`<role> listening on HOST:PORT` line and returns (Popen, "HOST:PORT"). The process's
output keeps being drained on a thread into `proc.output` (a deque of lines), so a
chatty child never blocks on a full pipe and a failing test can print what it said.
"""
from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time

LISTENING = re.compile(r"^(\w+) listening on (\S+):(\d+)")
METRICS = re.compile(r"metrics (http://\S+?/metrics)")
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "[::1]"}


def worker_env(**extra: str) -> dict[str, str]:
    """Environment for a child: one torch/OMP thread (tests share few cores), unbuffered."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start(command: str, *args: str, env: dict[str, str] | None = None,
          timeout: float = 90.0) -> tuple[subprocess.Popen, str]:
    """Run `pdmesh <command> --port 0 <args>`; return (process, address) once it listens.

    Raises RuntimeError with the process's output if it exits or stays silent too long.
    """
    cmd = [sys.executable, "-m", "pdmesh.cli", command, "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or worker_env(), start_new_session=True)
    proc.output = collections.deque(maxlen=400)
    proc.metrics_url = None  # its /metrics endpoint, from the listening line
    found: dict[str, str] = {}
    ready = threading.Event()

    def drain() -> None:
        for line in proc.stdout:
            proc.output.append(line.rstrip("\n"))
            m = LISTENING.match(line)
            if m and not ready.is_set():
                host = _WILDCARDS.get(m.group(2), m.group(2))
                found["addr"] = f"{host}:{m.group(3)}"
                if mm := METRICS.search(line):
                    proc.metrics_url = mm.group(1).replace("://0.0.0.0:", "://127.0.0.1:")
                ready.set()
        ready.set()  # EOF: the process is gone

    threading.Thread(target=drain, name=f"drain-{command}", daemon=True).start()
    if not ready.wait(timeout) or "addr" not in found:
        kill9(proc)
        raise RuntimeError(f"`pdmesh {command}` did not start:\n" + "\n".join(proc.output))
    return proc, found["addr"]


def start_registry(heartbeat_interval: float = 0.3, heartbeat_max_failure: int = 3,
                   *args: str) -> tuple[subprocess.Popen, str]:
    """A registry on 127.0.0.1 with a short lease (interval x max failure)."""
    return start("registry", "--host", "127.0.0.1",
                 "--heartbeat-interval", str(heartbeat_interval),
                 "--heartbeat-max-failure", str(heartbeat_max_failure), *args)


def start_prefill(registry: str, *args: str, env: dict[str, str] | None = None):
    """A prefill worker (default model) registered with `registry`."""
    return start("prefill", "--registry", registry, *args, env=env)


def start_decode(registry: str, *args: str, env: dict[str, str] | None = None):
    """A decode worker; pass "--role", "colocated" for a colocated one."""
    return start("decode", "--registry", registry, *args, env=env)


def terminate(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """SIGTERM (graceful shutdown), then SIGKILL if it has not exited within `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill9(proc)
    return proc.returncode


def kill9(proc: subprocess.Popen) -> None:
    """SIGKILL the process (no shutdown at all) and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Poll `predicate()` until true or `timeout` seconds passed; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        ok = predicate()
        if ok or time.monotonic() >= deadline:
            return bool(ok)
        time.sleep(interval)


# The cluster token of meshes from start_serve: tests calling workers or the registry
# directly pass it (auth.insecure_channel(addr, token=SERVE_TOKEN)).
SERVE_TOKEN = "pdmesh-test-cluster-token"


def start_serve(*args: str, token: str | None = SERVE_TOKEN, thread_rule: bool = False,
                ) -> tuple[subprocess.Popen, str, list[str]]:
    """Start `pdmesh serve` with cluster token `token` (None: serve mints one); return
    (process, REST base URL, its output lines so far). Its workers run one thread each,
    unless `thread_rule`: then serve picks their threads and priorities itself, as for a
    user (commands/placement.py)."""
    env = worker_env(PDMESH_CLUSTER_TOKEN=token or "")
    if token is None:
        del env["PDMESH_CLUSTER_TOKEN"]
    if thread_rule:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "PDMESH_CPU_NICE",
                  "PDMESH_NUM_THREADS", "PDMESH_PREFILL_THREADS"):
            env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-m", "pdmesh.cli", "serve", "--port", "0",
                             "--grpc-port", "0", "--heartbeat-interval", "0.5", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    lines: list[str] = []
    deadline = time.monotonic() + 240
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"ready — .*gateway (\S+)", line)
        if m:  # keep draining, or a full pipe would stall the mesh's logging
            threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
            return proc, f"http://{m.group(1).rstrip(',')}/v1", lines
        assert time.monotonic() < deadline, "".join(lines)
    raise AssertionError("pdmesh serve exited:\n" + "".join(lines))


def worker_addresses(lines: list[str], role: str) -> list[str]:
    """The gRPC addresses of the `role` workers, from serve's `ready — ...` line."""
    ready = next(line for line in lines if "pdmesh serve: ready" in line)
    return re.findall(rf"\b{role}-\d+ ([^\s,]+)", ready)


def pools_free(prefills: list[str], decodes: list[str]) -> bool:
    """Every listed worker's KV pool whole again: prefills (gRPC addresses) hold no room and
    no page; decodes (decode or colocated) use or quarantine no page and run or queue
    nothing."""
    from pdmesh import auth
    from pdmesh.v1 import decode_pb2 as dpb
    from pdmesh.v1 import decode_pb2_grpc as dgrpc
    from pdmesh.v1 import prefill_pb2 as ppb
    from pdmesh.v1 import prefill_pb2_grpc as pgrpc

    for addr in prefills:
        s = pgrpc.PrefillStub(auth.insecure_channel(addr, token=SERVE_TOKEN)).Stats(
            ppb.PrefillStatsRequest(), timeout=10)
        if not (s.free_pages == s.total_pages and s.rooms == 0):
            return False
    for addr in decodes:
        s = dgrpc.DecodeStub(auth.insecure_channel(addr, token=SERVE_TOKEN)).Stats(
            dpb.StatsRequest(), timeout=10)
        if not (s.free_pages == s.total_pages and s.used_pages == s.quarantined_pages == 0
                and s.running == s.queued == 0):
            return False
    return True


def chat_when_routable(client, **kw):
    """The gateway learns workers from the registry's Watch; retry briefly until it has."""
    return when_routable(client.chat.completions.create, **kw)


def when_routable(create, **kw):
    """`create(**kw)` (an openai client call), retried on 503 until the gateway routes."""
    import openai

    for _ in range(100):
        try:
            return create(**kw)
        except openai.APIStatusError as e:
            if e.status_code != 503:
                raise
            time.sleep(0.2)
    raise AssertionError("no workers became routable")


def metrics_urls(lines: list[str]) -> dict[str, str]:
    """Service name -> its /metrics URL, from serve's `metrics — ...` line."""
    line = next(line for line in lines if "pdmesh serve: metrics" in line)
    return dict(re.findall(r"([\w-]+) (http://\S+?/metrics)", line))


def metric(url: str, name: str, **labels: str) -> float:
    """The value of one sample (0 when absent) at a Prometheus /metrics URL."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def child_pids(parent: int, role: str) -> list[int]:
    """Pids of `parent`'s children whose command line is `pdmesh <role> ...`."""
    out = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            argv = open(f"/proc/{d}/cmdline").read().split("\0")
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if ppid == parent and role in argv[:4]:
            out.append(int(d))
    return out


def thread_nices(pid: int) -> list[int]:
    """The nice value of every thread of process `pid`."""
    out = []
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            out.append(os.getpriority(os.PRIO_PROCESS, int(t)))
        except OSError:  # the thread ended meanwhile
            pass
    return out
