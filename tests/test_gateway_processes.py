"""`pdmesh gateway --processes 2`: two gateway processes share the REST and gRPC ports,
both serve, /metrics sums both, and SIGTERM stops them all."""
from __future__ import annotations

import os
import signal
import subprocess

import openai
import pytest

from gateway_fakes import FakeMesh, start_worker
from mesh_procs import metric, wait_until
from pdmesh.v1 import registry_pb2 as rpb
from test_gateway import ENV, HELLO, spawn

N = 24


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return [int(x) for x in out.split()]


def served_by(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket connected to local `port` (a client's)."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True).stdout
    return f"pid={pid}," in out


@pytest.fixture(scope="module")
def group():
    reg, m = spawn(["registry", "--host", "127.0.0.1", "--port", "0",
                    "--heartbeat-interval", "0.3"], r"listening on (\S+)")
    registry = m.group(1)
    gw, m = spawn(["gateway", "--registry", registry, "--host", "127.0.0.1", "--port", "0",
                   "--grpc-port", "0", "--processes", "2"],
                  r"gateway listening on (\S+) \(REST\) and (\S+) \(gRPC\).*2 processes")
    fake = FakeMesh([11, 12, 13, 14])
    workers = [start_worker(fake, role, registry)
               for role in (rpb.WORKER_ROLE_PREFILL, rpb.WORKER_ROLE_DECODE)]
    yield gw, m.group(1)
    for server, client in workers:
        client.close()
        server.stop(0)
    reg.terminate()
    reg.wait(10)


def test_two_processes_share_the_port_and_the_metrics(group):
    gw, rest = group
    kids = children(gw.pid)
    assert len(kids) == 2
    port = int(rest.rsplit(":", 1)[1])
    seen: set[int] = set()
    for _ in range(N):  # a new connection each time: the kernel spreads them
        with openai.OpenAI(base_url=f"http://{rest}/v1", api_key="x", max_retries=5) as c:
            with c.chat.completions.create(model="default", messages=HELLO, max_tokens=4,
                                           stream=True) as stream:
                next(iter(stream))
                seen |= {k for k in kids if served_by(k, port)}
                list(stream)
    assert seen == set(kids), "one process took every connection"
    url = f"http://{rest}/metrics"
    assert wait_until(lambda: metric(url, "pdmesh_gateway_requests_total",
                                     endpoint="ChatCompletions", status="OK") == N, 5)
    gw.send_signal(signal.SIGTERM)
    assert gw.wait(30) == 0
    assert all(not os.path.exists(f"/proc/{k}") for k in kids)
