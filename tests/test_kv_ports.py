"""No transfer-engine port in a single-host mesh; across hosts the engine starts on demand.

Mooncake's ports listen on every interface and authenticate no peer, so a mesh on one
host (KV by shared memory) must not open them at all; a pair on two hosts (played here
with PDMESH_HOST_ID on the decode) starts both engines when the first room needs them.
"""
from __future__ import annotations

import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from mesh_procs import (chat_when_routable, metric, metrics_urls, start, start_decode,
                        start_prefill, start_registry, start_serve, terminate, worker_env)
from pdmesh import Engine, SamplingParams

QUESTION = "Name three rivers in Europe."
KV = "50000000"


@pytest.fixture(scope="module")
def expected(default_model):
    return Engine(loaded=default_model, num_pages=64).generate(
        messages=[{"role": "user", "content": QUESTION}],
        params=SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]


def ask(base: str):
    import openai

    client = openai.OpenAI(base_url=base, api_key="unused")
    return chat_when_routable(client, model="default", max_tokens=8, temperature=0,
                              messages=[{"role": "user", "content": QUESTION}],
                              extra_body={"ignore_eos": True})


def listening(pid: int) -> dict[int, set[int]]:
    """TCP ports in LISTEN state of process `pid` and each of its descendants, by pid."""
    root = psutil.Process(pid)
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            out[p.pid] = {c.laddr.port for c in p.net_connections("tcp")
                          if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            continue
    return out


def tree_ports(pid: int) -> set[int]:
    """Listening ports of `pid` and its descendants (a worker's engine process)."""
    return set().union(*listening(pid).values())


def told(lines) -> set[int]:
    """Ports the services said they listen on (gRPC, REST, metrics)."""
    return {int(p) for line in lines if "listening on" in line or "metrics" in line
            for p in re.findall(r"[\w.\]]:(\d+)\b", line)}


def test_single_host_serve_opens_no_transfer_engine_port(expected):
    proc, base, lines = start_serve("--prefill", "1", "--decode", "1",
                                    f"--worker-arg=--kv-cache-bytes={KV}")
    try:
        res = ask(base)
        assert res.choices[0].message.content == expected.text
        ports, allowed = listening(proc.pid), told(lines)
        assert len(ports) >= 5, ports  # serve, registry, prefill, decode, gateway
        extra = {pid: sorted(p - allowed) for pid, p in ports.items() if p - allowed}
        assert not extra, f"unexpected listening ports {extra}:\n{''.join(lines)}"
        # the KV did move, by shared memory
        url = metrics_urls(lines)["prefill-0"]
        assert metric(url, "pdmesh_kv_transfer_bytes_total", path="shm") > 0
        assert metric(url, "pdmesh_kv_transfer_bytes_total", path="mooncake") == 0
        assert not any("transfer engine started" in line for line in lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines)


def test_pair_on_two_hosts_starts_both_engines_on_first_room(expected):
    reg, registry = start_registry()
    procs = [reg]
    try:
        with ThreadPoolExecutor(3) as ex:  # the decode plays a second host
            started = [ex.submit(start_prefill, registry, "--kv-cache-bytes", KV),
                       ex.submit(start_decode, registry, "--kv-cache-bytes", KV,
                                 "--engine-process",  # the engine starts in its child
                                 env=worker_env(PDMESH_HOST_ID="another-host")),
                       ex.submit(start, "gateway", "--registry", registry, "--host",
                                 "127.0.0.1", "--grpc-port", "0")]
            for f in started:  # each one started is stopped, even if another failed
                if f.exception() is None:
                    procs.append(f.result()[0])
            (pre, _), (dec, _), (gw, rest) = [f.result() for f in started]
        before = {p.pid: tree_ports(p.pid) for p in (pre, dec)}
        for p in (pre, dec):  # gRPC and metrics only, though the peer is on another host
            assert before[p.pid] <= told(p.output), (before[p.pid], list(p.output))
        t0 = time.perf_counter()
        res = ask(f"http://{rest}/v1")
        first = time.perf_counter() - t0
        assert res.choices[0].message.content == expected.text
        t0 = time.perf_counter()
        assert ask(f"http://{rest}/v1").choices[0].message.content == expected.text
        print(f"first request {first * 1e3:.0f} ms (engines start), second "
              f"{(time.perf_counter() - t0) * 1e3:.0f} ms")
        for p in (pre, dec):  # no engine port before the first room, one after
            assert tree_ports(p.pid) - before[p.pid], "\n".join(p.output)
            started = [ln for ln in p.output if ln.startswith("KV transfer engine started")]
            assert len(started) == 1, "\n".join(p.output)
            print(started[0])
        assert metric(pre.metrics_url, "pdmesh_kv_transfer_bytes_total", path="mooncake") > 0
        assert metric(pre.metrics_url, "pdmesh_kv_transfer_bytes_total", path="shm") == 0
    finally:
        for p in reversed(procs):
            terminate(p)
