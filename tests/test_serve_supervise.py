"""`pdmesh serve` supervises: a child that dies is restarted while the others keep
serving (the registry on its port: the gateway routes from its last view meanwhile and
every worker registers again), and no child outlives a SIGKILL of serve."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import requests

from mesh_procs import SERVE_TOKEN, start_serve, wait_until, worker_addresses
from pdmesh import auth
from pdmesh.v1 import chaos_pb2 as cpb
from pdmesh.v1 import chaos_pb2_grpc as cgrpc
from pdmesh.v1 import registry_pb2 as rpb
from pdmesh.v1 import registry_pb2_grpc as rgrpc


def children(pid: int) -> dict[str, int]:
    """serve's children: "registry" / "prefill" / "decode" / "gateway" -> pid."""
    out = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid=,args="], capture_output=True,
                         text=True).stdout
    found = {}
    for line in out.splitlines():
        m = re.search(r"pdmesh\.cli (\w+)", line)
        if m:
            found[m.group(1)] = int(line.split()[0])
    return found


def chat(base: str) -> str:
    r = requests.post(f"{base}/chat/completions", timeout=60, json={
        "model": "default", "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _current(lines: list[str], name: str) -> str:
    """The gRPC address `name` listens on now: its last restart's, else serve's ready line."""
    for line in reversed(lines):
        m = re.search(rf"{name} restarted, listening on (\S+)", line)
        if m:
            return m.group(1).rstrip(",")
    return worker_addresses(lines, name.split("-")[0])[0]


def serves(base: str, want: str, tries: int) -> bool:
    """The mesh answers `want` again (the gateway has routed to a restarted worker)."""
    for _ in range(tries):
        try:
            if chat(base) == want:
                return True
        except AssertionError:
            pass
        time.sleep(0.2)
    return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not reaped) is gone too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_serve_restarts_dead_children_and_they_die_with_it():
    proc, base, lines = start_serve("--prefill", "1", "--decode", "1",
                                    "--heartbeat-max-failure", "2", "--chaos")
    try:
        ready = next(x for x in lines if "pdmesh serve: ready" in x)
        registry = re.search(r"registry (\S+?),", ready).group(1)
        reg = rgrpc.RegistryStub(auth.insecure_channel(
            registry, token=SERVE_TOKEN, options=[("grpc.max_reconnect_backoff_ms", 500)]))

        def members() -> int:
            try:
                return len(reg.ListWorkers(rpb.ListWorkersRequest(), timeout=2).workers)
            except Exception:
                return -1
        assert wait_until(lambda: members() == 2, 30)
        want = chat(base)
        kids = children(proc.pid)
        assert set(kids) == {"registry", "prefill", "decode", "gateway"}

        # the registry dies: the gateway keeps serving from its last view; the registry
        # comes back on its port and both workers register again
        os.kill(kids["registry"], signal.SIGKILL)
        assert chat(base) == want
        assert wait_until(lambda: any("registry restarted, listening on " + registry in x
                                      for x in lines), 60), "".join(lines[-30:])
        t_back = time.monotonic()
        assert wait_until(lambda: members() == 2, 10), "workers did not register again"
        print(f"workers registered again {time.monotonic() - t_back:.2f} s after the "
              "registry's listening line (heartbeat interval 0.5 s)")
        assert chat(base) == want

        # a worker dies: restarted with a new port, registered, serving
        os.kill(kids["decode"], signal.SIGKILL)
        assert wait_until(lambda: any(re.search(r"decode-1 restarted, listening on", x)
                                      for x in lines), 90), "".join(lines[-30:])
        assert wait_until(lambda: members() == 2, 10)
        assert serves(base, want, 50), "the restarted decode never served"
        assert any("decode-1 exited (-9); restarting it" in x for x in lines)

        # the decode's engine fails (pdmesh.v1.Chaos engine.fail_step, as a bug or a
        # device error would): the request on it ends with a clear error (or is retried
        # once the decode is back), the worker stops with exit 1 and is restarted
        addr = _current(lines, "decode-1")
        chaos = cgrpc.ChaosStub(auth.insecure_channel(addr, token=SERVE_TOKEN))
        chaos.Inject(cpb.ChaosFault(engine=cpb.EngineFault(fail_step=True)), timeout=10)
        r = requests.post(f"{base}/chat/completions", timeout=60, json={
            "model": "default", "messages": [{"role": "user", "content": "Say hi"}],
            "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200 or r.json()["error"]["message"], r.text
        assert wait_until(lambda: any("decode-1 exited (1); restarting it" in x
                                      for x in lines), 60), "".join(lines[-30:])
        assert any("the decode engine failed" in x for x in lines)
        assert wait_until(lambda: members() == 2, 60)
        assert serves(base, want, 100), "the decode restarted after its engine failed never served"

        # SIGKILL of serve: no child survives it (PR_SET_PDEATHSIG), restarted ones included
        kids = children(proc.pid)
        assert len(kids) == 4
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert wait_until(lambda: not any(alive(p) for p in kids.values()), 40), \
            {k: p for k, p in kids.items() if alive(p)}
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in children(proc.pid).values():
            os.kill(p, signal.SIGKILL)
