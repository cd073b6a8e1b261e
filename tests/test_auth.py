"""The cluster token and the gateway's API key (pdmesh/auth.py).

Unit tests on an in-process registry; then one real `pdmesh serve` mesh (a token minted
by serve, the API key from a file) tried as an attacker and as a client, and a gateway
process taking its key from PDMESH_API_KEY."""
from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import grpc
import httpx2 as httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mesh_procs import (chat_when_routable, kill9, start, start_serve, terminate,
                        worker_addresses, worker_env)
from pdmesh import auth
from pdmesh.config import AuthConfig, auth_config_from_env
from pdmesh.registry_client import RegistryClient
from pdmesh.v1 import decode_pb2 as dpb
from pdmesh.v1 import decode_pb2_grpc as dgrpc
from pdmesh.v1 import gateway_pb2_grpc as ggrpc
from pdmesh.v1 import openai_pb2 as opb
from pdmesh.v1 import prefill_pb2 as ppb
from pdmesh.v1 import prefill_pb2_grpc as pgrpc
from pdmesh.v1 import registry_pb2 as rpb
from pdmesh.v1 import registry_pb2_grpc as rgrpc

TOKEN = "unit-test-token"
KEY = "sk-auth-test-key-31337"
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


def registry_calls(stub) -> dict:
    """Every Registry RPC, as a thunk (Watch reads its first event)."""
    fake = rpb.RegisterRequest(role=rpb.WORKER_ROLE_DECODE, address="10.6.6.6:666",
                               model_id="default")
    return {"Register": lambda: stub.Register(fake, timeout=5),
            "Heartbeat": lambda: stub.Heartbeat(rpb.HeartbeatRequest(worker_id="w"), timeout=5),
            "Deregister": lambda: stub.Deregister(rpb.DeregisterRequest(worker_id="w"), timeout=5),
            "ListWorkers": lambda: stub.ListWorkers(rpb.ListWorkersRequest(), timeout=5),
            "Watch": lambda: next(stub.Watch(rpb.WatchRequest(), timeout=5))}


def refused(call) -> str:
    """The details of `call`'s UNAUTHENTICATED error (fails if it was not refused)."""
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == UNAUTH, e.value
    return e.value.details()


def healthy(addr: str) -> bool:
    with grpc.insecure_channel(addr) as ch:  # no token: health stays open
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def services(addr: str) -> list[str]:
    """grpcurl list, without a token."""
    with grpc.insecure_channel(addr) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    return [s.name for s in resp.list_services_response.service]


# ---- units ----------------------------------------------------------------------------
def test_matches_and_config(tmp_path):
    assert auth.matches("abc", "abc") and auth.matches(b"abc", "abc")
    assert not auth.matches("abd", "abc") and not auth.matches(None, "abc")
    assert not auth.matches("clé", "abc")  # non-ASCII is refused, not a TypeError
    assert auth_config_from_env(env={"PDMESH_CLUSTER_TOKEN": "t0k"}).cluster_token == "t0k"
    assert auth_config_from_env(env={}).cluster_token is None
    for bad in ("", "two words", "line\n"):
        with pytest.raises(ValueError):
            AuthConfig(cluster_token=bad)
    assert "t0k" not in repr(AuthConfig(cluster_token="t0k"))
    f = tmp_path / "token"
    f.write_text("s3cret\n")
    assert auth.read_secret_file(str(f)) == "s3cret"
    f.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        auth.read_secret_file(str(f))
    with pytest.raises(ValueError, match="cannot read"):
        auth.read_secret_file(str(tmp_path / "missing"))


def test_server_interceptors_choice(caplog):
    assert auth.server_interceptors(["pdmesh.v1.Gateway"], "t") == []  # public: API key
    with caplog.at_level(logging.WARNING, logger="pdmesh.auth"):
        assert auth.server_interceptors(["pdmesh.v1.Registry"], None) == []
    assert caplog.messages == [auth.UNAUTHENTICATED_WARNING]
    [guard] = auth.server_interceptors(["pdmesh.v1.Registry"], "t")
    assert guard.allows("/grpc.health.v1.Health/Check", ())
    assert guard.allows("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", ())
    assert not guard.allows("/pdmesh.v1.Registry/Register", ())
    assert not guard.allows("/pdmesh.v1.Registry/Register", ((auth.METADATA_KEY, "x"),))
    assert guard.allows("/pdmesh.v1.Registry/Register", ((auth.METADATA_KEY, "t"),))


@pytest.fixture
def closed_registry():
    """An in-process registry whose process token is TOKEN."""
    from pdmesh.services.bootstrap.server import create_server

    auth.configure(TOKEN)
    server, port = create_server("127.0.0.1:0")
    yield f"127.0.0.1:{port}"
    server.stop(0)
    auth.configure(auth.PROCESS)


def test_interceptor_in_process(closed_registry):
    addr = closed_registry
    for token in (None, "wrong"):
        with auth.insecure_channel(addr, token=token) as ch:
            for name, call in registry_calls(rgrpc.RegistryStub(ch)).items():
                assert "cluster token" in refused(call), name
    assert healthy(addr) and "pdmesh.v1.Registry" in services(addr)
    with RegistryClient(addr, rpb.RegisterRequest(   # the process token, sent by the client
            role=rpb.WORKER_ROLE_PREFILL, address="127.0.0.1:1", model_id="m")) as client:
        client.heartbeat_once()
        with auth.insecure_channel(addr) as ch:
            stub = rgrpc.RegistryStub(ch)
            workers = stub.ListWorkers(rpb.ListWorkersRequest(), timeout=5).workers
            assert [w.worker_id for w in workers] == [client.worker_id]
            assert next(stub.Watch(rpb.WatchRequest(), timeout=5)).worker.worker_id == \
                client.worker_id


def test_aio_channel_carries_token(closed_registry):
    asyncio.run(_aio_calls(closed_registry))


async def _aio_calls(addr: str) -> None:
    async with auth.aio_insecure_channel(addr) as ch:
        await rgrpc.RegistryStub(ch).ListWorkers(rpb.ListWorkersRequest(), timeout=5)
    async with auth.aio_insecure_channel(addr, token="nope") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await rgrpc.RegistryStub(ch).ListWorkers(rpb.ListWorkersRequest(), timeout=5)
        assert e.value.code() == UNAUTH


def test_registry_process_token_file_or_open(tmp_path):
    """--cluster-token-file closes a `pdmesh registry`; without a token it warns once."""
    env = worker_env()
    env.pop("PDMESH_CLUSTER_TOKEN", None)
    (tmp_path / "token").write_text("file-token\n")
    closed, c_addr = start("registry", "--host", "127.0.0.1", "--cluster-token-file",
                           str(tmp_path / "token"), env=env)
    opened, o_addr = start("registry", "--host", "127.0.0.1", env=env)
    try:
        refused(lambda: registry_calls(rgrpc.RegistryStub(
            auth.insecure_channel(c_addr, token=None)))["ListWorkers"]())
        with auth.insecure_channel(c_addr, token="file-token") as ch:
            rgrpc.RegistryStub(ch).ListWorkers(rpb.ListWorkersRequest(), timeout=5)
        with grpc.insecure_channel(o_addr) as ch:  # open: anyone may call
            rgrpc.RegistryStub(ch).ListWorkers(rpb.ListWorkersRequest(), timeout=5)
        warned = [line for p in (closed, opened) for line in p.output
                  if auth.UNAUTHENTICATED_WARNING in line]
        assert len(warned) == 1 and "file-token" not in "".join(closed.output)
    finally:
        for p in (closed, opened):
            terminate(p)


def test_worker_with_a_wrong_token_exits_with_one_line(tmp_path):
    """A worker the registry refuses says so in one line and exits 1, no traceback."""
    (tmp_path / "token").write_text("right-token\n")
    env = worker_env()
    env.pop("PDMESH_CLUSTER_TOKEN", None)
    reg, addr = start("registry", "--host", "127.0.0.1", "--cluster-token-file",
                      str(tmp_path / "token"), env=env)
    try:
        env["PDMESH_CLUSTER_TOKEN"] = "wrong-token"
        run = subprocess.run([sys.executable, "-m", "pdmesh.cli", "decode", "--registry", addr,
                              "--port", "0", "--kv-cache-bytes", "20000000"], env=env,
                             capture_output=True, text=True, timeout=180)
        assert run.returncode == 1, run.stdout + run.stderr
        assert "Traceback" not in run.stderr, run.stderr
        err = [line for line in run.stderr.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and "refused this decode worker: UNAUTHENTICATED" in err[0]
        assert "wrong-token" not in run.stdout + run.stderr
    finally:
        terminate(reg)


# ---- a real mesh -----------------------------------------------------------------------
def _children(pid: int) -> dict[int, str]:
    """pid -> command line of every descendant of `pid`."""
    out: dict[int, str] = {}
    parents = {pid}
    for _ in range(3):
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid in parents:
                    out[int(d)] = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError, ValueError):
                continue
        parents |= set(out)
    return out


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode().split("=", 1) for kv in raw if b"=" in kv)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("auth") / "api-key"
    key_file.write_text(KEY + "\n")
    proc, base, lines = start_serve(f"--gateway-arg=--api-key-file={key_file}",
                                    "--worker-arg=--kv-cache-bytes=50000000", token=None)
    try:
        yield proc, base, lines
    finally:
        terminate(proc, 60)


def test_serve_mints_a_token_and_closes_the_mesh(mesh):
    proc, base, lines = mesh
    ready = next(line for line in lines if "pdmesh serve: ready" in line)
    registry = re.search(r"registry (\S+?),", ready).group(1)
    children = _children(proc.pid)
    gateway = next(pid for pid, cmd in children.items() if " gateway " in cmd)
    token = _environ(gateway)["PDMESH_CLUSTER_TOKEN"]
    assert len(token) >= 40  # token_urlsafe(32)
    for cmd in [Path(f"/proc/{proc.pid}/cmdline").read_text(), *children.values()]:
        assert token not in cmd and KEY not in cmd  # neither shows in `ps`

    # an attacker: no token, or a wrong one, on every registry and worker RPC
    for bad in (None, "guess"):
        with auth.insecure_channel(registry, token=bad) as ch:
            for name, call in registry_calls(rgrpc.RegistryStub(ch)).items():
                refused(call)
        for addr in worker_addresses(lines, "prefill"):
            p = pgrpc.PrefillStub(auth.insecure_channel(addr, token=bad))
            refused(lambda: p.Prefill(ppb.PrefillRequest(room=1, token_ids=[1]), timeout=5))
            refused(lambda: p.Transfer(ppb.TransferRequest(room=1), timeout=5))
            refused(lambda: p.Abort(ppb.PrefillAbortRequest(room=1), timeout=5))
            refused(lambda: p.Stats(ppb.PrefillStatsRequest(), timeout=5))
        for addr in worker_addresses(lines, "decode"):
            d = dgrpc.DecodeStub(auth.insecure_channel(addr, token=bad))
            refused(lambda: next(d.Generate(dpb.DecodeRequest(room=1, token_ids=[1]),
                                            timeout=5)))
            refused(lambda: d.SlowDown(dpb.SlowDownRequest(forward_sleep_time=5), timeout=5))
            refused(lambda: d.Abort(dpb.DecodeAbortRequest(room=1), timeout=5))
    workers = worker_addresses(lines, "prefill") + worker_addresses(lines, "decode")
    assert all(healthy(a) for a in [registry, *workers])
    with auth.insecure_channel(registry, token=token) as ch:  # the mesh's own view
        listed = rgrpc.RegistryStub(ch).ListWorkers(rpb.ListWorkersRequest(), timeout=5)
    assert sorted(w.address for w in listed.workers) == sorted(workers)  # no fake joined
    d = dgrpc.DecodeStub(auth.insecure_channel(worker_addresses(lines, "decode")[0], token=token))
    assert d.Stats(dpb.StatsRequest(), timeout=5).total_pages > 0


def test_serve_chat_with_api_key_file(mesh):
    import openai

    _, base, lines = mesh
    client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0)
    res = chat_when_routable(client, model="default", max_tokens=8, temperature=0,
                             messages=[{"role": "user", "content": "Say hi"}])
    assert res.usage.completion_tokens > 0 and res.choices[0].message.content
    for wrong in ("Bearer sk-wrong", f"Basic {KEY}", f"Bearer {KEY}x"):
        r = httpx.get(f"{base}/models", headers={"Authorization": wrong})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{base}/models").status_code == 401
    grpc_addr = re.search(r"and (\S+) \(gRPC\)", "".join(lines)).group(1)
    check_grpc_key(grpc_addr)


def check_grpc_key(addr: str) -> None:
    """ListModels with the key works; without it, or with a wrong one: UNAUTHENTICATED."""
    with grpc.insecure_channel(addr) as ch:
        stub = ggrpc.GatewayStub(ch)
        ok = stub.ListModels(opb.ListModelsRequest(), timeout=10,
                             metadata=[("authorization", f"Bearer {KEY}")])
        assert ok.object == "list"
        refused(lambda: stub.ListModels(opb.ListModelsRequest(), timeout=10))
        refused(lambda: stub.ListModels(opb.ListModelsRequest(), timeout=10,
                                        metadata=[("authorization", "Bearer sk-nope")]))


def test_gateway_api_key_from_env():
    """PDMESH_API_KEY, and a gateway with no workers (ListModels needs none)."""
    env = dict(os.environ, PDMESH_API_KEY=KEY, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc, rest = start("gateway", "--registry", "127.0.0.1:9", "--host", "127.0.0.1",
                       "--grpc-port", "0", env=env)
    try:
        base = f"http://{rest}/v1"
        assert httpx.get(f"{base}/models", headers={"Authorization": f"Bearer {KEY}"}
                         ).status_code == 200
        assert httpx.get(f"{base}/models").status_code == 401
        line = next(x for x in proc.output if "(gRPC)" in x)
        check_grpc_key(re.search(r"and (\S+) \(gRPC\)", line).group(1))
        assert KEY not in Path(f"/proc/{proc.pid}/cmdline").read_text()
    finally:
        if terminate(proc) is None:
            kill9(proc)
