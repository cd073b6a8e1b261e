"""Bad input gets a clear, typed error, and the mesh keeps serving.

A real registry and `pdmesh gateway` process over fake workers (tests/gateway_fakes.py),
plus one real decode worker (own registry) for the corrupt-bytes case:
- corrupt protobuf bytes: INVALID_ARGUMENT "request is not a valid pdmesh.v1.X message"
  on the gateway, the registry and a worker, and no traceback in their logs;
- REST 404 / 405 / 413: OpenAI error JSON typed invalid_request_error, saying what was wrong;
- OpenAI parameters pdmesh does not implement (tools, response_format, best_of, ...): 400
  naming the parameter; their "unused" values are accepted;
- request limits (stop strings, top logprobs, max_tokens and prompt vs context): 400 / gRPC
  INVALID_ARGUMENT naming the limit;
- a worker's failure reaches the client without the worker's address, with a request id
  that the gateway's log has next to the full detail.
After every test a normal request still succeeds.
"""
from __future__ import annotations

import re
import time

import grpc
import httpx2 as httpx
import pytest

import mesh_procs
from gateway_fakes import PREFILL_FAILS, FakeMesh, start_worker, stop_workers
from test_gateway import HELLO, KEY, MAX_LEN, REPLY, tok  # noqa: F401 (fixture)
from pdmesh.v1 import common_pb2 as cpb
from pdmesh.v1 import gateway_pb2 as gpb
from pdmesh.v1 import gateway_pb2_grpc as gpb_grpc
from pdmesh.v1 import registry_pb2 as rpb

MAX_BODY = 64 << 10  # small, so a 413 costs little
AUTH = {"Authorization": f"Bearer {KEY}"}
CORRUPT = b"\x0a\xff\x01"  # field 1, length 255, then one byte: not a message
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def mesh(tok):
    reg, registry = mesh_procs.start_registry()
    gw, rest = mesh_procs.start("gateway", "--registry", registry, "--host", "127.0.0.1",
                                "--grpc-port", "0", "--api-key", KEY, "--max-model-len",
                                str(MAX_LEN), "--max-body-bytes", str(MAX_BODY))
    fake = FakeMesh(tok.encode(REPLY, add_special_tokens=False))
    fake.registry, fake.rest, fake.procs = registry, rest, {"gateway": gw, "registry": reg}
    fake.grpc = next(m.group(1) for line in gw.output
                     if (m := re.search(r"and (\S+) \(gRPC\)", line)))
    fake.workers = [start_worker(fake, role, registry)
                    for role in (rpb.WORKER_ROLE_PREFILL, rpb.WORKER_ROLE_DECODE)]
    deadline = time.monotonic() + 10
    while httpx.get(f"http://{rest}/health").status_code != 200:
        assert time.monotonic() < deadline, "/health never answered 200"
        time.sleep(0.05)
    yield fake
    stop_workers(fake)
    for p in (gw, reg):
        assert mesh_procs.terminate(p) == 0


@pytest.fixture(autouse=True)
def still_serves(mesh):
    """Whatever a test sent, the mesh serves a normal request afterwards."""
    yield
    r = post(mesh, {"model": "default", "messages": HELLO, "max_tokens": 2})
    assert r.status_code == 200, r.text


def post(mesh, body, path=CHAT, **kw):
    return httpx.post(f"http://{mesh.rest}{path}", json=body, headers=AUTH, **kw)


def openai_error(r, status: int, *needles: str) -> dict:
    """The OpenAI error of `r`: status, invalid_request_error, message naming `needles`."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error", err
    assert all(n in err["message"] for n in needles), err
    return err


def grpc_error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        r = call(*args)
        if hasattr(r, "__next__"):
            next(r)
    return e.value


def corrupt_call(addr: str, method: str, stream: bool, metadata=()) -> grpc.RpcError:
    with grpc.insecure_channel(addr) as ch:
        fn = (ch.unary_stream if stream else ch.unary_unary)(method)
        return grpc_error(lambda: fn(CORRUPT, metadata=metadata, timeout=10))


# -- 1. corrupt protobuf bytes --------------------------------------------------------

@pytest.mark.parametrize("service,method,stream,message", [
    ("gateway", "/pdmesh.v1.Gateway/ChatCompletions", True, "pdmesh.v1.ChatCompletionRequest"),
    ("gateway", "/pdmesh.v1.Gateway/ListModels", False, "pdmesh.v1.ListModelsRequest"),
    ("registry", "/pdmesh.v1.Registry/Register", False, "pdmesh.v1.RegisterRequest"),
    ("registry", "/pdmesh.v1.Registry/Watch", True, "pdmesh.v1.WatchRequest"),
])
def test_corrupt_bytes_get_invalid_argument(mesh, service, method, stream, message):
    addr = mesh.grpc if service == "gateway" else mesh.registry
    e = corrupt_call(addr, method, stream, metadata=(("authorization", f"Bearer {KEY}"),))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    assert e.details() == f"request is not a valid {message} message"
    assert not any("Traceback" in line for line in mesh.procs[service].output)


def test_corrupt_bytes_to_a_worker_get_invalid_argument():
    reg, registry = mesh_procs.start_registry()
    worker, addr = mesh_procs.start_decode(registry, "--kv-cache-bytes", str(16 << 20))
    try:
        for method, stream in (("Generate", True), ("Stats", False)):
            e = corrupt_call(addr, f"/pdmesh.v1.Decode/{method}", stream)
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "is not a valid pdmesh.v1." in e.details()
        with grpc.insecure_channel(addr) as ch:  # and it still answers a valid call
            ch.unary_unary("/pdmesh.v1.Decode/Stats")(b"", timeout=10)
        assert not any("Traceback" in line for line in worker.output)
    finally:
        mesh_procs.terminate(worker), mesh_procs.terminate(reg)


# -- 2. REST routing errors ------------------------------------------------------------

def test_unknown_path_is_404(mesh):
    openai_error(post(mesh, {}, path="/v1/nope"), 404, "POST /v1/nope")


def test_wrong_method_is_405(mesh):
    r = httpx.get(f"http://{mesh.rest}{CHAT}", headers=AUTH)
    openai_error(r, 405, "GET", CHAT, "POST")


def test_body_too_large_is_413(mesh):
    big = {"model": "default", "messages": [{"role": "user", "content": "x" * MAX_BODY}]}
    openai_error(post(mesh, big), 413, "too large", str(MAX_BODY))


# -- 3. parameters pdmesh does not implement --------------------------------------------

@pytest.mark.parametrize("path,param,value", [
    (CHAT, "tools", [{"type": "function", "function": {"name": "f"}}]),
    (CHAT, "tool_choice", "auto"),
    (CHAT, "functions", [{"name": "f"}]),
    (CHAT, "function_call", "auto"),
    (CHAT, "response_format", {"type": "json_object"}),
    (CHAT, "logit_bias", {"42": 5}),
    (COMPLETIONS, "best_of", 2),
    (COMPLETIONS, "suffix", "end"),
    (COMPLETIONS, "logit_bias", {"42": 5}),
])
def test_unsupported_parameters_are_400(mesh, path, param, value):
    body = {"model": "default", "messages": HELLO, "prompt": "Hi", param: value}
    err = openai_error(post(mesh, body, path=path), 400, f"'{param}' is not supported")
    assert err["param"] == param


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("n,needle", [(17, "'n' must be at most 16"), (0, "'n' must be at least 1")])
def test_choices_outside_the_limit_are_400(mesh, path, n, needle):
    body = {"model": "default", "messages": HELLO, "prompt": "Hi", "n": n}
    openai_error(post(mesh, body, path=path), 400, needle)


@pytest.mark.parametrize("path,extra", [
    (CHAT, {"response_format": {"type": "text"}, "logit_bias": {}, "tools": [],
            "tool_choice": "none"}),
    (COMPLETIONS, {"best_of": 1, "suffix": None, "logit_bias": None}),
])
def test_their_unused_values_are_accepted(mesh, path, extra):
    body = {"model": "default", "messages": HELLO, "prompt": "Hi", "max_tokens": 2, **extra}
    assert post(mesh, body, path=path).status_code == 200


# -- 5. request limits -------------------------------------------------------------------

@pytest.mark.parametrize("path,extra,needles", [
    (CHAT, {"stop": [f"s{i}" for i in range(17)]}, ("'stop'", "17", "16")),
    (CHAT, {"stop": "x" * 257}, ("'stop'", "256")),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, ("'top_logprobs'", "20")),
    (COMPLETIONS, {"logprobs": 21}, ("'logprobs'", "20")),
    (CHAT, {"max_tokens": MAX_LEN + 1}, ("maximum context length",)),
    (COMPLETIONS, {"prompt": "hi " * (MAX_LEN + 10)}, ("maximum context length",)),
])
def test_limits_are_400(mesh, path, extra, needles):
    body = {"model": "default", "messages": HELLO, "prompt": "Hi", **extra}
    openai_error(post(mesh, body, path=path), 400, *needles)


def test_limits_on_grpc_are_invalid_argument(mesh):
    with grpc.insecure_channel(mesh.grpc) as ch:
        stub = gpb_grpc.GatewayStub(ch)
        md = (("authorization", f"Bearer {KEY}"),)
        for sp, needle in ((cpb.SamplingParams(stop=["s"] * 17), "'stop'"),
                           (cpb.SamplingParams(logprobs=21), "'sampling_params.logprobs'")):
            req = gpb.GenerateRequest(model="default", text="Hi", sampling_params=sp)
            e = grpc_error(lambda: stub.Generate(req, metadata=md, timeout=10))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.details()


# -- 4. worker failures do not reveal worker addresses ----------------------------------

def test_worker_failure_hides_worker_addresses(mesh):
    body = {"model": "default", "messages": HELLO, "seed": PREFILL_FAILS}
    r = post(mesh, body)
    assert r.status_code == 503, r.text
    message = r.json()["error"]["message"]
    assert "127.0.0.1" not in message and not re.search(r":\d{2,5}\b", message), message
    rid = re.search(r"req-[0-9a-f]+", message).group(0)
    deadline = time.monotonic() + 5  # the gateway's log has the detail, under that id
    while not any(rid in line and "127.0.0.1:" in line for line in mesh.procs["gateway"].output):
        assert time.monotonic() < deadline, list(mesh.procs["gateway"].output)[-5:]
        time.sleep(0.05)


@pytest.mark.parametrize("message,hidden", [
    ("decode worker 10.0.0.7:41234 failed: UNAVAILABLE: gone", True),
    ("prefill worker [fd00::7]:50061 failed", True),
    ("decode worker gpu-node-3.internal:50061 failed", True),
    ("no worker is registered that can serve this request (routing mode auto)", False),
])
def test_which_messages_are_hidden(message, hidden):
    from pdmesh.services.gateway import errors
    assert errors.reveals_internals(grpc.StatusCode.UNAVAILABLE, message) == hidden
    public = errors.public(grpc.StatusCode.UNAVAILABLE, message)
    assert (public != message) == hidden and ("req-" in public) == hidden


def test_limits_come_from_env_and_are_checked():
    from pdmesh.config import GatewayConfig, gateway_config_from_env
    env = {"PDMESH_GATEWAY_MAX_STOP_STRINGS": "4", "PDMESH_GATEWAY_MAX_STOP_CHARS": "8",
           "PDMESH_GATEWAY_MAX_TOP_LOGPROBS": "5", "PDMESH_GATEWAY_MAX_BODY_BYTES": "1024"}
    c = gateway_config_from_env(GatewayConfig(), env)
    assert (c.max_stop_strings, c.max_stop_chars, c.max_top_logprobs, c.max_body_bytes) == \
        (4, 8, 5, 1024)
    for bad in ({"max_top_logprobs": 21}, {"max_body_bytes": 0}, {"max_stop_strings": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GatewayConfig(**bad)
