"""The gateway's OpenAPI document, and a CI-sized fuzz of a real `pdmesh serve`.

- /openapi.json is generated from the protos (google.api.http + descriptors): the
  OpenAI routes with their fields and documented errors, valid for schemathesis;
- benchmarks/fuzz.py at CI size against a real 1P1D mesh (default model, short context):
  schemathesis cases from the served document and hypothesis-built gRPC messages plus
  raw garbage, every request with a deadline: no 5xx, none past its deadline, no process
  exited, the greedy prompt gives the same tokens afterwards, no KV page left in use;
- what the fuzzer found, pinned: each is a 400 / INVALID_ARGUMENT naming the field, and
  the mesh keeps serving (a repetition penalty of 1e-308 used to kill the prefill's
  engine thread and hang every later request; token ids past 2^32 a 500).
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fuzz  # noqa: E402  (benchmarks/fuzz.py)

from pdmesh.v1 import common_pb2 as cpb  # noqa: E402
from pdmesh.v1 import gateway_pb2 as gpb  # noqa: E402
from pdmesh.v1 import gateway_pb2_grpc as gpb_grpc  # noqa: E402
from pdmesh.v1 import openai_pb2 as opb  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402

REST_CASES, GRPC_CASES = 1000, 1000


def test_openapi_document_from_the_protos():
    import schemathesis

    from pdmesh.services.gateway.openapi import openapi_document

    doc = openapi_document([gpb.DESCRIPTOR.services_by_name["Gateway"]], api_key=True)
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(doc["paths"])
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["x-grpc-method"] == "/pdmesh.v1.Gateway/ChatCompletions"
    assert {"200", "400", "401", "404", "413", "429"} <= set(chat["responses"])
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert chat["security"] == [{"bearerAuth": []}]
    req = doc["components"]["schemas"]["pdmesh.v1.ChatCompletionRequest"]
    assert req["required"] == ["messages"]
    props = req["properties"]
    # every field of the message, typed as json_format reads it
    assert set(props) == {f.name for f in opb.ChatCompletionRequest.DESCRIPTOR.fields}
    assert props["max_tokens"] == {"type": "integer", "minimum": 0, "maximum": (1 << 32) - 1,
                                   "description": props["max_tokens"]["description"]}
    assert props["messages"]["items"] == {"$ref": "#/components/schemas/pdmesh.v1.ChatMessage"}
    assert props["temperature"]["type"] == "number"
    assert doc["paths"]["/v1/models"]["get"]["responses"]["200"]["content"][
        "application/json"]["schema"] == {"$ref": "#/components/schemas/pdmesh.v1.ListModelsResponse"}
    schemathesis.openapi.from_dict(doc)["/v1/completions"]["POST"]  # loads and resolves


@pytest.fixture(scope="module")
def mesh():
    with tempfile.NamedTemporaryFile("w", suffix=".key", delete=False) as f:
        f.write(fuzz.API_KEY)
    m = fuzz.start_serve(64, [], f.name)
    try:
        fuzz.wait_routable(m.rest)
        m.ref = fuzz.greedy_rest(m.rest, fuzz.API_KEY), fuzz.greedy_grpc(m.grpc, fuzz.API_KEY)
        yield m
    finally:
        rc = fuzz.stop_serve(m)
        os.unlink(f.name)
    assert rc == 0, "\n".join(list(m.lines)[-50:])


def post(mesh, path: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://{mesh.rest}{path}", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {fuzz.API_KEY}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.mark.parametrize("path,body,needle", [
    # found by the fuzzer: the prefill's engine thread died on NaN probabilities
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 3, "repetition_penalty": 1e-308}',
     "repetition_penalty"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 3, "temperature": "Infinity"}',
     "temperature"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
     b'"max_tokens": 3, "min_tokens": 2, "temperature": "Infinity"}', "temperature"),
    # found by the fuzzer: an id past uint32 failed building the worker's request (500)
    ("/v1/completions", b'{"prompt": [1e30], "max_tokens": 2}', "vocabulary"),
    ("/v1/completions", b'{"prompt": [49152], "max_tokens": 2, "echo": true}', "vocabulary"),
])
def test_what_the_fuzzer_found_is_a_400(mesh, path, body, needle):
    status, err = post(mesh, path, body)
    assert status == 400, err
    assert needle in err["error"]["message"], err
    status, ok = post(mesh, "/v1/completions", json.dumps(
        {"prompt": fuzz.GREEDY_PROMPT, "max_tokens": 8, "temperature": 0}).encode())
    assert status == 200 and ok["choices"][0]["text"] == mesh.ref[0]


def _grpc_values():
    """Requests only gRPC can send: ids past the vocabulary, NaN / inf inside a
    google.protobuf.Value (json_format.MessageToDict raised on them: UNKNOWN before)."""
    content = struct_pb2.Value()
    content.list_value.values.add().struct_value.update({"type": "text", "text": "hi"})
    content.list_value.values.add().number_value = math.inf
    chat = opb.ChatCompletionRequest(max_tokens=2)
    chat.messages.add(role="user").content.CopyFrom(content)
    prompt = opb.CompletionRequest(max_tokens=2)
    prompt.prompt.list_value.values.add().number_value = math.nan
    stop = opb.CompletionRequest(max_tokens=2)
    stop.prompt.string_value = "hi"
    stop.stop.number_value = math.inf
    return [("Generate", gpb.GenerateRequest(token_ids=[1, (1 << 32) - 1]), "vocabulary"),
            ("ChatCompletions", chat, "only text parts"), ("Completions", prompt, "'prompt'"),
            ("Completions", stop, "'stop'")]


@pytest.mark.parametrize("method,request_,needle", _grpc_values())
def test_grpc_values_only_grpc_can_send(mesh, method, request_, needle):
    with grpc.insecure_channel(mesh.grpc) as ch:
        call = getattr(gpb_grpc.GatewayStub(ch), method)
        with pytest.raises(grpc.RpcError) as e:
            list(call(request_, metadata=[("authorization", f"Bearer {fuzz.API_KEY}")],
                      timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert needle in e.value.details()


def test_fuzz_rest_and_grpc(mesh):
    """Schemathesis from the served /openapi.json + hypothesis gRPC messages: no 5xx,
    nothing past its deadline, nothing crashed, and the mesh still answers correctly."""
    with urllib.request.urlopen(f"http://{mesh.rest}/openapi.json", timeout=10) as r:
        doc = json.load(r)
    t0 = time.monotonic()
    rest = fuzz.rest_cases(doc, REST_CASES, seed=7, key=fuzz.API_KEY, derandomize=True,
                           near=0.1)
    grpc_cases = fuzz.grpc_cases(GRPC_CASES, seed=7, garbage=0.1, derandomize=True, near=0.1)
    counts = {"REST": fuzz.Counts(), "gRPC": fuzz.Counts()}
    for kind, cases in (("REST", rest), ("gRPC", grpc_cases)):
        asyncio.run(fuzz.fire(mesh, cases, 16, 30.0, counts[kind], fuzz.API_KEY, 7))
    report = {k: (c.requests, c.fault_5xx, c.past_deadline, c.transport, dict(c.statuses),
                  dict(c.examples)) for k, c in counts.items()}
    print(f"fuzzed {sum(c.requests for c in counts.values())} requests in "
          f"{time.monotonic() - t0:.0f} s: {report}")
    for kind, c in counts.items():
        assert c.requests >= 0.9 * (REST_CASES if kind == "REST" else GRPC_CASES), report
        assert c.fault_5xx == 0 and c.past_deadline == 0 and c.transport == 0, dict(c.examples)
    # some of each kind got through to the workers, some were refused
    assert counts["REST"].statuses["HTTP 200"] > 0 and counts["REST"].statuses["HTTP 400"] > 0
    assert counts["gRPC"].statuses["gRPC OK"] > 0
    assert counts["gRPC"].statuses["gRPC INVALID_ARGUMENT"] > 0
    assert mesh.alive() and not mesh.exited_children(), "\n".join(list(mesh.lines)[-50:])
    assert mesh.tracebacks() == 0, "\n".join(list(mesh.lines)[-80:])
    assert (fuzz.greedy_rest(mesh.rest, fuzz.API_KEY),
            fuzz.greedy_grpc(mesh.grpc, fuzz.API_KEY)) == mesh.ref
    assert fuzz.wait_pages_free(mesh, 10), fuzz.pages_in_use(mesh)


def test_a_grpc_deadline_goes_on_to_both_legs():
    """The dispatcher gives both worker calls what is left of the client's deadline."""
    from types import SimpleNamespace

    from pdmesh.services.gateway.dispatch import Dispatcher
    from pdmesh.v1 import decode_pb2_grpc, prefill_pb2_grpc

    seen = {}

    class Stub:
        def __init__(self, leg):
            self.leg = leg

        def __getattr__(self, method):
            return lambda request, **kw: seen.setdefault(self.leg, kw)

    d = Dispatcher(SimpleNamespace(breakers=SimpleNamespace(metrics=None)),
                   SimpleNamespace(name="default"))
    d.legs._stubs[("D:1", decode_pb2_grpc.DecodeStub)] = Stub("decode")
    d.legs._stubs[("P:1", prefill_pb2_grpc.PrefillStub)] = Stub("prefill")
    route = SimpleNamespace(decode=SimpleNamespace(address="D:1", worker_id="d"),
                            prefill=SimpleNamespace(address="P:1", worker_id="p"))
    d.legs.calls(route, 7, [1, 2], cpb.SamplingParams(), deadline=time.monotonic() + 5)
    assert 4.5 < seen["decode"]["timeout"] <= 5 and 4.5 < seen["prefill"]["timeout"] <= 5
    seen.clear()
    d.legs.calls(route, 7, [1, 2], cpb.SamplingParams())  # no deadline: none on the legs
    assert seen["decode"]["timeout"] is None and seen["prefill"]["timeout"] is None


def test_a_passed_grpc_deadline_frees_everything(mesh):
    """A gRPC client whose deadline passes mid-generation gets DEADLINE_EXCEEDED at its
    deadline; both legs end, every KV page comes back, and the mesh serves as before."""
    with grpc.insecure_channel(mesh.grpc) as ch:
        stub = gpb_grpc.GatewayStub(ch)
        # 48 tokens take ~1 s here; with the prompt in the prefix cache after the first
        # round a 1 s deadline was sometimes met, so every deadline is well inside that
        for deadline in (0.05, 0.2, 0.4):
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(gpb.GenerateRequest(
                    text="Count to one hundred:", sampling_params=cpb.SamplingParams(
                        max_tokens=48, ignore_eos=True, temperature=0)),
                    metadata=[("authorization", f"Bearer {fuzz.API_KEY}")],
                    timeout=deadline))
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - t0 < deadline + 1.0
    assert fuzz.wait_pages_free(mesh, 15), fuzz.pages_in_use(mesh)
    assert (fuzz.greedy_rest(mesh.rest, fuzz.API_KEY),
            fuzz.greedy_grpc(mesh.grpc, fuzz.API_KEY)) == mesh.ref


_ANY_FLOAT = (fuzz.st.floats(allow_nan=True, allow_infinity=True)
              | fuzz.st.floats(-3, 3) | fuzz.st.sampled_from([0.0, 1e-308, 1e308, 1e-40]))


@fuzz.settings(max_examples=400, deadline=None, database=None, derandomize=True)
@fuzz.given(temperature=_ANY_FLOAT, top_p=_ANY_FLOAT, min_p=_ANY_FLOAT,
            repetition_penalty=_ANY_FLOAT, frequency_penalty=_ANY_FLOAT,
            presence_penalty=_ANY_FLOAT, top_k=fuzz.st.integers(-2, 100),
            min_tokens=fuzz.st.integers(0, 3), masked=fuzz.st.integers(0, 31),
            logprobs=fuzz.st.none() | fuzz.st.integers(0, 20))
def test_every_accepted_sampling_params_samples(**kw):
    """What the fuzzer found twice (repetition_penalty 1e-308, then temperature 1e308 or
    top_p 1e-308: NaN probabilities, and the engine thread died): whatever SamplingParams
    accepts, the sampler draws a token from, masks (min_tokens) and penalties included."""
    import torch

    from pdmesh.runtime.sampler import SamplingRow, sample
    from pdmesh.runtime.sampling_params import SamplingParams

    masked = kw.pop("masked")
    try:
        params = SamplingParams(max_tokens=4, **kw)
    except ValueError:
        return  # refused: a 400 at the gateway, INVALID_ARGUMENT at a worker
    logits = torch.randn(2, 32) * 10
    rows = [SamplingRow(params, [1, 2, 3, masked], [masked, 4], None, (masked, 5)),
            SamplingRow(params, [7], [], None, ())]
    for tok in sample(logits, rows):
        assert 0 <= tok.token_id < 32
