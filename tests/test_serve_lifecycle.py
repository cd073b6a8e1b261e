"""`pdmesh serve` leaves no child behind: a start that fails (early or late) stops every
child it started, and SIGKILL of serve itself takes its services down (PR_SET_PDEATHSIG).

Serve runs in its own session (start_new_session), so every process it started, and
theirs, is found by scanning /proc for that session id, even after serve is gone.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from mesh_procs import wait_until, worker_env
from test_packaging import SITECUSTOMIZE

LIGHT = ("--colocated", "1", "--prefill", "0", "--decode", "0",
         "--worker-arg=--kv-cache-bytes=20000000", "--heartbeat-interval", "0.5")


def session_procs(sid: int) -> list[int]:
    """Pids of the live (not zombie) processes of session `sid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2:].split()[:4]
        if int(session) == sid and state not in "ZX":
            pids.append(int(entry))
    return pids


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pdmesh.cli", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or worker_env(), start_new_session=True)


def until_ready(proc: subprocess.Popen) -> list[str]:
    """serve's output lines up to its ready line (the test fails if it never comes)."""
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("pdmesh serve: ready"):
            return lines
    pytest.fail("pdmesh serve did not come up:\n" + "".join(lines) + proc.stderr.read())


@pytest.fixture
def busy_port():
    """A port some other program is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("flag", ["--port", "--grpc-port"])
def test_a_gateway_port_in_use_fails_fast_with_one_line(busy_port, flag):
    ports = {"--port": "0", "--grpc-port": "0", flag: str(busy_port)}
    t0 = time.monotonic()
    proc = serve(*[x for kv in ports.items() for x in kv], *LIGHT)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 10
    assert proc.returncode == 1
    assert err.splitlines() == [f"pdmesh serve: error: the gateway "
                                f"{'REST' if flag == '--port' else 'gRPC'} port "
                                f"127.0.0.1:{busy_port} ({flag}) is not free: "
                                "Address already in use"], err
    assert out == ""  # no child was started
    assert session_procs(proc.pid) == []


def test_a_service_failing_later_stops_the_ones_already_started():
    """The gateway exits at start (a bad flag) after the registry and a worker are up."""
    proc = serve("--port", "0", "--grpc-port", "0", "--gateway-arg=--no-such-flag", *LIGHT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    assert "[registry] registry listening" in out and "[colocated-0] colocated listening" in out
    assert "pdmesh serve: error: gateway did not start (exit code 2)" in err
    assert "Traceback" not in err
    assert session_procs(proc.pid) == []


def test_b_sigkill_of_serve_takes_every_child_down(tmp_path):
    """Also: a colocated-only mesh runs where Mooncake is not installed at all."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = worker_env(PYTHONPATH=os.pathsep.join(
        p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p),
        PDMESH_TEST_MOONCAKE="missing")
    proc = serve("--port", "0", "--grpc-port", "0", *LIGHT, env=env)
    lines = until_ready(proc)
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining
    gateway = int(lines[-1].rsplit("gateway 127.0.0.1:", 1)[1].split()[0].rstrip(","))
    children = [p for p in session_procs(proc.pid) if p != proc.pid]
    assert len(children) == 3, children  # registry, colocated-0, gateway
    socket.create_connection(("127.0.0.1", gateway), timeout=5).close()

    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    t0 = time.monotonic()
    assert wait_until(lambda: not session_procs(proc.pid), timeout=15), session_procs(proc.pid)
    print(f"children gone {time.monotonic() - t0:.1f} s after SIGKILL of serve")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gateway), timeout=5)


def _launch_log(monkeypatch, fail: str = "") -> tuple[list[tuple[str, str]], list, Exception | None]:
    """launch() of 2P1D with spawn/wait_ready faked: (the calls in order, the children,
    the error); `fail`: the child whose wait_ready raises StartError."""
    import argparse

    from pdmesh.commands import serve as sv

    calls: list[tuple[str, str]] = []

    def spawn(name, argv, env):
        calls.append(("spawn", name))
        return sv.Child(name, None, threading.Event(), address=f"127.0.0.1:{len(calls)}")

    def wait_ready(child, timeout, stop, said=None):
        calls.append(("wait", child.name))
        assert timeout > 0
        if child.name == fail:
            raise sv.StartError(f"{child.name} did not start")

    monkeypatch.setattr(sv, "spawn", spawn)
    monkeypatch.setattr(sv, "wait_ready", wait_ready)
    p = argparse.ArgumentParser()
    sv.add_arguments(p)
    children: list = []
    try:
        sv.launch(p.parse_args(["--prefill", "2", "--decode", "1"]), children, threading.Event())
    except sv.StartError as e:
        return calls, children, e
    return calls, children, None


def test_workers_start_together_then_the_gateway(monkeypatch):
    """Every worker is spawned before the first is waited for (a 2P2D mesh on 2 CPU cores
    was ready in 18.3 s one after another, 11.8 s together); the gateway comes last."""
    calls, children, err = _launch_log(monkeypatch)
    workers = ["prefill-0", "prefill-1", "decode-2"]
    assert err is None
    assert calls == [("spawn", "registry"), ("wait", "registry"),
                     *[("spawn", w) for w in workers], *[("wait", w) for w in workers],
                     ("spawn", "gateway"), ("wait", "gateway")]
    assert [c.name for c in children] == ["registry", *workers, "gateway"]


def test_a_worker_failing_to_start_leaves_every_started_child_to_stop(monkeypatch):
    """The caller stops what `children` holds: the workers started beside the failed one
    are in it, the gateway never started."""
    calls, children, err = _launch_log(monkeypatch, fail="prefill-0")
    assert isinstance(err, Exception) and "prefill-0" in str(err)
    assert [c.name for c in children] == ["registry", "prefill-0", "prefill-1", "decode-2"]
    assert ("spawn", "gateway") not in calls


def test_ready_waits_for_every_gateway_process():
    """With `--gateway-arg=--processes=3`, serve's ready line comes after the gateway
    group says all 3 listen, not at the first process's echoed line (it did: requests
    then all went to the one process up, and each other one's first request paid its
    start-up later)."""
    proc = serve("--port", "0", "--grpc-port", "0", "--gateway-arg=--processes=3", *LIGHT)
    try:
        lines = until_ready(proc)
        own = [i for i, x in enumerate(lines) if x.startswith("[gateway] [gateway-")
               and "listening on" in x]
        group = [i for i, x in enumerate(lines) if x.startswith("[gateway] gateway listening")]
        assert len(own) == 3 and group and max(own) < group[0] < len(lines) - 1, lines
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
