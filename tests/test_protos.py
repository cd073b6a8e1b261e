"""The contract (protos/) and its generated stubs (pdmesh/v1/) agree, and is documented."""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent


def _gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen():
    return _gen_protos()


@pytest.fixture(scope="module")
def files(gen, tmp_path_factory) -> list[descriptor_pb2.FileDescriptorProto]:
    """Our .proto files as descriptors with source info (comments)."""
    path = gen.descriptor_set(tmp_path_factory.mktemp("desc") / "set.pb")
    fds = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    return [f for f in fds.file if f.name.startswith("pdmesh/")]


def test_committed_stubs_match_regenerated(gen, tmp_path):
    """Fails when a .proto was edited without running scripts/gen_protos.py."""
    gen.generate(tmp_path)
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "pdmesh" / "v1").iterdir()}
    committed = {p.name: p.read_bytes() for p in (ROOT / "pdmesh" / "v1").iterdir()
                 if p.is_file() and p.suffix in (".py", ".pyi")}
    assert sorted(committed) == sorted(fresh), "stub files differ: run scripts/gen_protos.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run scripts/gen_protos.py"


def _missing_comments(f: descriptor_pb2.FileDescriptorProto) -> list[str]:
    """Every message, field, enum, enum value, service and RPC without a leading comment."""
    documented = {tuple(loc.path) for loc in f.source_code_info.location
                  if loc.leading_comments.strip()}
    missing: list[str] = []

    def need(path: tuple, name: str) -> None:
        if path not in documented:
            missing.append(f"{f.name}: {name}")

    def enum(e, path, prefix):
        need(path, f"{prefix}{e.name}")
        for j, v in enumerate(e.value):
            need(path + (2, j), f"{prefix}{e.name}.{v.name}")

    def message(m, path, prefix):
        need(path, f"{prefix}{m.name}")
        for j, fld in enumerate(m.field):
            need(path + (2, j), f"{prefix}{m.name}.{fld.name}")
        for j, nested in enumerate(m.nested_type):
            if not nested.options.map_entry:
                message(nested, path + (3, j), f"{prefix}{m.name}.")
        for j, e in enumerate(m.enum_type):
            enum(e, path + (4, j), f"{prefix}{m.name}.")

    for i, m in enumerate(f.message_type):
        message(m, (4, i), "")
    for i, e in enumerate(f.enum_type):
        enum(e, (5, i), "")
    for i, s in enumerate(f.service):
        need((6, i), s.name)
        for j, rpc in enumerate(s.method):
            need((6, i, 2, j), f"{s.name}.{rpc.name}")
    return missing


def test_every_element_documented(files):
    assert {f.name for f in files} >= {"pdmesh/v1/registry.proto", "pdmesh/v1/prefill.proto",
                                       "pdmesh/v1/decode.proto", "pdmesh/v1/gateway.proto"}
    missing = [m for f in files for m in _missing_comments(f)]
    assert not missing, "undocumented proto elements:\n" + "\n".join(missing)


def test_services_and_rpcs():
    from pdmesh.v1 import decode_pb2, gateway_pb2, prefill_pb2, registry_pb2

    def rpcs(module, name):
        return {m.name for m in module.DESCRIPTOR.services_by_name[name].methods}

    assert rpcs(registry_pb2, "Registry") == {"Register", "Heartbeat", "Deregister",
                                               "ListWorkers", "Watch"}
    assert rpcs(prefill_pb2, "Prefill") == {"Prefill", "Transfer", "Abort", "Stats"}
    assert rpcs(decode_pb2, "Decode") == {"Generate", "Abort", "SlowDown", "Stats"}
    assert rpcs(gateway_pb2, "Gateway") >= {"Generate", "Chat", "ChatCompletions",
                                            "Completions", "ListModels"}
    watch = registry_pb2.DESCRIPTOR.services_by_name["Registry"].methods_by_name["Watch"]
    assert watch.server_streaming and not watch.client_streaming


def test_sampling_params_mirrors_runtime():
    """The proto SamplingParams has exactly the runtime dataclass's fields."""
    from pdmesh.runtime.sampling_params import SamplingParams
    from pdmesh.v1 import common_pb2

    proto_fields = set(common_pb2.SamplingParams.DESCRIPTOR.fields_by_name)
    assert proto_fields == {f.name for f in dataclasses.fields(SamplingParams)}


def test_http_annotations():
    """The REST routes the gateway's transcoder derives from the descriptors."""
    from google.api import annotations_pb2
    from pdmesh.v1 import gateway_pb2

    routes = {}
    for method in gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        kind = rule.WhichOneof("pattern")
        if kind:
            routes[method.name] = (kind, getattr(rule, kind), rule.body)
    assert routes["ChatCompletions"] == ("post", "/v1/chat/completions", "*")
    assert routes["Completions"] == ("post", "/v1/completions", "*")
    assert routes["ListModels"] == ("get", "/v1/models", "")


def test_openai_json_round_trip():
    """OpenAI JSON (union-typed stop/content, unknown fields) parses with field names kept."""
    from google.protobuf import json_format
    from pdmesh.v1 import openai_pb2

    body = ('{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b"],'
            ' "max_tokens": 5, "stream_options": {"include_usage": true}, "logit_bias": {}}')
    req = json_format.Parse(body, openai_pb2.ChatCompletionRequest(), ignore_unknown_fields=True)
    assert req.max_tokens == 5 and req.HasField("max_tokens") and not req.HasField("temperature")
    assert [v.string_value for v in req.stop.list_value.values] == ["a", "b"]
    assert req.messages[0].content.string_value == "hi"
    assert req.stream_options.include_usage
    out = json_format.MessageToDict(req, preserving_proto_field_name=True)
    assert out["stream_options"] == {"include_usage": True}
