"""TLS and mTLS on the mesh (pdmesh/tls.py): certificate checks at start, `pdmesh dev-ca`,
and real `pdmesh serve --tls-dir` meshes.

- a TLS mesh serves the same greedy tokens as a plaintext one (openai client over https,
  gRPC through pdmesh.client with the CA);
- on the TLS mesh, a client without a client certificate, with one from another CA, or
  in plaintext cannot Register, Prefill or Generate; one with the mesh CA's certificate
  and no cluster token can (mTLS is the credential);
- a bad TLS file stops a service at start with one line and exit code 2.
"""
from __future__ import annotations

import re
import ssl
import stat
import subprocess
import sys

import grpc
import pytest

from mesh_procs import chat_when_routable, start_serve, terminate, worker_addresses, worker_env
from pdmesh import auth, tls
from pdmesh.config import AuthConfig
from pdmesh.v1 import decode_pb2 as dpb, decode_pb2_grpc as dgrpc
from pdmesh.v1 import prefill_pb2 as ppb, prefill_pb2_grpc as pgrpc
from pdmesh.v1 import registry_pb2 as rpb, registry_pb2_grpc as rgrpc

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    tls.mint_dev_ca(d)
    return d


def material(cert=None, key=None, ca=None) -> tls.TLSMaterial | None:
    return tls.load(AuthConfig(tls_cert=cert and str(cert), tls_key=key and str(key),
                               tls_ca=ca and str(ca)))


# ---- files -----------------------------------------------------------------------------
def test_dev_ca_writes_a_ca_and_certificates_it_signed(ca):
    from cryptography import x509

    names = sorted(p.name for p in ca.iterdir())
    assert names == ["ca-key.pem", "ca.pem", "client-key.pem", "client.pem",
                     "server-key.pem", "server.pem"]
    for key in ("ca-key.pem", "client-key.pem", "server-key.pem"):
        assert stat.S_IMODE((ca / key).stat().st_mode) == 0o600
    root = x509.load_pem_x509_certificate((ca / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((ca / "server.pem").read_bytes())
    server.verify_directly_issued_by(root)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    m = material(*tls.dir_files(str(ca)))
    assert m.has_identity and m.mutual


def test_tls_file_errors_are_one_line(ca, tmp_path):
    cert, key, root = tls.dir_files(str(ca))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    (tmp_path / "bad.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    cases = [
        (dict(cert=tmp_path / "missing.pem", key=key), "cannot read --tls-cert .*missing.pem: No such file"),
        (dict(cert=cert, key=ca / "client-key.pem"), "--tls-key .*client-key.pem does not match --tls-cert .*server.pem"),
        (dict(cert=cert), "--tls-cert and --tls-key go together"),
        (dict(cert=tmp_path / "junk.pem", key=key), "junk.pem is not a PEM file"),
        (dict(cert=tmp_path / "bad.pem", key=key), "bad.pem holds no valid PEM certificate"),
        (dict(cert=cert, key=cert), "--tls-key .*server.pem is not an unencrypted PEM private key"),
        (dict(cert=cert, key=key, ca=tmp_path / "nope.pem"), "cannot read --tls-ca"),
    ]
    for kwargs, message in cases:
        with pytest.raises(tls.TLSError, match=message) as e:
            material(**kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(tls.TLSError, match="a server needs --tls-cert and --tls-key"):
        tls.require_server_identity(material(ca=root))
    assert material() is None  # nothing given: plaintext


def test_flags_and_env(ca, monkeypatch):
    import argparse

    from pdmesh.commands import auth_flags

    p = argparse.ArgumentParser()
    auth_flags.add_arguments(p)
    cert, key, root = tls.dir_files(str(ca))
    monkeypatch.setenv("PDMESH_TLS_CERT", cert)
    monkeypatch.setenv("PDMESH_TLS_KEY", key)
    config = auth_flags.config_from_args(p.parse_args([]))  # env alone
    assert (config.tls_cert, config.tls_key, config.tls_ca) == (cert, key, None)
    config = auth_flags.config_from_args(p.parse_args(
        ["--tls-dir", str(ca), "--tls-ca", str(ca / "client.pem")]))  # flags over dir
    assert (config.tls_cert, config.tls_ca) == (cert, str(ca / "client.pem"))
    assert auth_flags.forward(config) == ["--tls-cert", cert, "--tls-key", key,
                                          "--tls-ca", str(ca / "client.pem")]
    monkeypatch.delenv("PDMESH_TLS_CERT")
    monkeypatch.delenv("PDMESH_TLS_KEY")
    with pytest.raises(tls.TLSError):  # a CA alone: fine for a tool, not for a server
        auth_flags.config_from_args(p.parse_args(["--tls-ca", root]))
    assert auth_flags.config_from_args(p.parse_args(["--tls-ca", root]), serves=False).tls_ca


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdmesh.cli", *argv], env=worker_env(),
                          capture_output=True, text=True, timeout=120)


def test_bad_tls_files_stop_a_service_at_start(ca, tmp_path):
    cert, key, root = tls.dir_files(str(ca))
    runs = [
        (_cli("registry", "--port", "0", "--tls-cert", cert, "--tls-key",
              str(ca / "client-key.pem")), "does not match"),
        (_cli("serve", "--port", "0", "--grpc-port", "0", "--tls-dir", str(tmp_path / "none")),
         "cannot read --tls-cert"),
        (_cli("gateway", "--port", "0", "--grpc-port", "0", "--tls-ca", root),
         "a server needs --tls-cert"),
    ]
    for run, message in runs:
        assert run.returncode == 2, run.stdout + run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], run.stderr


# ---- real meshes -----------------------------------------------------------------------
def _grpc_addr(lines: list[str]) -> str:
    return re.search(r"and (\S+) \(gRPC\)", "".join(lines)).group(1)


def _outputs(base: str, grpc_addr: str, ca_file: str | None) -> tuple[str, list[int], str]:
    """(chat text via the openai client, token ids and text via gRPC Generate)."""
    import openai

    from pdmesh.client import Client

    http = openai.DefaultHttpxClient(verify=_trusting(ca_file)) if ca_file else None
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, http_client=http)
    chat = chat_when_routable(client, model="default", max_tokens=12, temperature=0,
                              messages=CHAT).choices[0].message.content
    ids, text = [], []
    with Client(grpc_addr, tls_ca=ca_file) as c:
        for m in c.generate_stream(PROMPT, max_tokens=12, temperature=0):
            ids += m.token_ids
            text.append(m.text)
    return chat, ids, "".join(text)


def _trusting(ca_file) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


MESH_ARGS = ("--worker-arg=--kv-cache-bytes=50000000",)


@pytest.fixture(scope="module")
def plaintext_outputs():
    proc, base, lines = start_serve(*MESH_ARGS)
    try:
        return _outputs(base, _grpc_addr(lines), None)
    finally:
        terminate(proc, 60)


@pytest.fixture(scope="module")
def tls_mesh(ca, plaintext_outputs):  # after the plaintext mesh: one mesh at a time
    proc, base, lines = start_serve("--tls-dir", str(ca), "--colocated", "1", *MESH_ARGS)
    try:
        yield base.replace("http://", "https://"), lines
    finally:
        terminate(proc, 60)


def test_tls_mesh_serves_the_plaintext_mesh_tokens(ca, tls_mesh, plaintext_outputs):
    base, lines = tls_mesh
    chat, ids, text = _outputs(base, _grpc_addr(lines), str(ca / "ca.pem"))
    assert len(ids) == 12 and chat
    assert (chat, ids, text) == plaintext_outputs


def _refused(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
    return e.value.code()


def test_only_mesh_certificates_reach_internal_services(ca, tls_mesh, tmp_path):
    _, lines = tls_mesh
    registry = re.search(r"registry (\S+?),", next(l for l in lines if "serve: ready" in l)).group(1)
    prefill = worker_addresses(lines, "prefill")[0]
    decode = worker_addresses(lines, "decode")[0]
    colocated = worker_addresses(lines, "colocated")[0]
    root = ca / "ca.pem"
    other = tmp_path / "other"
    tls.mint_dev_ca(other)
    intruders = {
        "no client certificate": material(ca=root),
        "another CA's certificate": material(other / "client.pem", other / "client-key.pem", root),
        "plaintext": None,
    }
    fake = rpb.RegisterRequest(role=rpb.WORKER_ROLE_DECODE, address="127.0.0.1:9", model_id="default")
    for who, m in intruders.items():
        # the cluster token would not help either: the handshake fails first
        with auth.channel(registry, token="guess", tls=m) as ch:
            _refused(lambda: rgrpc.RegistryStub(ch).Register(fake, timeout=5))
        with auth.channel(prefill, token=None, tls=m) as ch:
            _refused(lambda: pgrpc.PrefillStub(ch).Prefill(
                ppb.PrefillRequest(room=1, token_ids=[1]), timeout=5))
        for addr in (decode, colocated):
            with auth.channel(addr, token=None, tls=m) as ch:
                _refused(lambda: next(dgrpc.DecodeStub(ch).Generate(
                    dpb.DecodeRequest(room=1, token_ids=[1]), timeout=5)))
    # the mesh CA's client certificate and no token: past the credential check
    member = material(ca / "client.pem", ca / "client-key.pem", root)
    with auth.channel(registry, token=None, tls=member) as ch:
        stub = rgrpc.RegistryStub(ch)
        workers = stub.ListWorkers(rpb.ListWorkersRequest(), timeout=5).workers
        assert sorted(w.address for w in workers) == sorted([prefill, decode, colocated])
        with pytest.raises(grpc.RpcError) as e:  # a write, authorized: unknown worker
            stub.Heartbeat(rpb.HeartbeatRequest(worker_id="nobody"), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    for addr in (decode, colocated):
        with auth.channel(addr, token=None, tls=member) as ch:
            assert dgrpc.DecodeStub(ch).Stats(dpb.StatsRequest(), timeout=5).total_pages > 0


def test_gateway_ports_take_tls_without_client_certificate(ca, tls_mesh):
    import httpx2 as httpx

    from pdmesh.v1 import gateway_pb2_grpc as ggrpc, openai_pb2 as opb

    base, lines = tls_mesh
    addr = _grpc_addr(lines)
    with auth.channel(addr, token=None, tls=material(ca=ca / "ca.pem")) as ch:
        assert ggrpc.GatewayStub(ch).ListModels(opb.ListModelsRequest(), timeout=10).object == "list"
    with grpc.insecure_channel(addr) as ch:  # plaintext to a TLS port
        _refused(lambda: ggrpc.GatewayStub(ch).ListModels(opb.ListModelsRequest(), timeout=5))
    assert httpx.get(f"{base}/models", verify=_trusting(ca / "ca.pem")).status_code == 200
    with pytest.raises(httpx.HTTPError):  # plain http to the https port
        httpx.get(base.replace("https://", "http://") + "/models", timeout=5)
    with pytest.raises(httpx.HTTPError):  # a client that does not trust the mesh's CA
        httpx.get(f"{base}/models", timeout=5)


def test_a_plaintext_worker_cannot_join_a_tls_mesh(tls_mesh):
    """It is refused at the handshake: exit 1, one error line that names TLS."""
    _, lines = tls_mesh
    registry = re.search(r"registry (\S+?),", next(l for l in lines if "serve: ready" in l)).group(1)
    run = _cli("decode", "--role", "colocated", "--registry", registry, "--port", "0",
               "--kv-cache-bytes", "20000000", "--registry-wait", "1")  # UNAVAILABLE: asked again
    assert run.returncode == 1, run.stdout + run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr
    assert "refused this colocated worker: UNAVAILABLE" in errors[0]
    assert "give this process the mesh's --tls-* flags" in errors[0]
    assert "(asked for 1 s)" in errors[0]  # not answering: asked again until --registry-wait
