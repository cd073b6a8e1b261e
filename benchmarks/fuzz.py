"""Fuzz the gateway of a live `pdmesh serve`: REST by schemathesis from its /openapi.json,
gRPC by hypothesis-generated protobuf messages for every public Gateway RPC, plus raw
garbage bytes on both. Every request has a deadline.

    nice -n 10 .venv/bin/python benchmarks/fuzz.py --requests 100000 [--out FILE.md]

Starts `pdmesh serve` (default model, 1P1D, an API key, a short context so that whatever
the fuzzer gets accepted generates few tokens), checks a greedy prompt, then sends
`--requests` generated requests, about half REST and half gRPC:
  REST  schemathesis cases from the served /openapi.json, positive (schema-conforming)
        and negative (violating it) for every operation; most carry the right API key,
        some a wrong one or none; plus non-JSON / truncated / binary bodies;
  gRPC  messages built by hypothesis from each Gateway method's request descriptor
        (every field, any value its type allows, boundary numbers, NaN, unicode, unknown
        enum values, nested messages), and a fraction of raw bytes: random, or a valid
        message with bytes flipped or cut, sent with an identity serializer.
It counts requests, 5xx (REST status >= 500; gRPC UNKNOWN, INTERNAL, UNAVAILABLE,
DATA_LOSS, UNIMPLEMENTED), requests past their deadline (no complete answer in
--deadline seconds), crashes (a serve child that exited) and tracebacks in the mesh's
log; then checks that the greedy prompt gives the same tokens as before, over REST and
gRPC, and that every worker's KV pages are back to free. Prints a markdown table; exits
1 when any of those is not zero / not equal.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
from google.protobuf import descriptor as _d
from google.protobuf import message_factory
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

API_KEY = "sk-fuzz"
GREEDY_PROMPT = "The capital of France is"
# gRPC codes that are the server's fault (REST: 5xx); DEADLINE_EXCEEDED counts apart
SERVER_FAULT = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
                grpc.StatusCode.UNIMPLEMENTED}
GATEWAY = "pdmesh.v1.Gateway"


# ---------------------------------------------------------------------------- the mesh

@dataclass
class Mesh:
    proc: subprocess.Popen
    rest: str  # host:port
    grpc: str  # host:port
    lines: collections.deque
    metrics: dict[str, str]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exited_children(self) -> list[str]:
        return [ln for ln in self.lines if re.search(r"pdmesh serve: \S+ exited", ln)]

    def tracebacks(self) -> int:
        return sum(1 for ln in self.lines if "Traceback (most recent call last)" in ln)


def start_serve(max_model_len: int, extra: list[str], key_file: str,
                log_path: str | None = None) -> Mesh:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("PDMESH_CLUSTER_TOKEN", "pdmesh-fuzz-cluster-token")
    cmd = [sys.executable, "-m", "pdmesh.cli", "serve", "--port", "0", "--grpc-port", "0",
           "--heartbeat-interval", "1", f"--gateway-arg=--max-model-len={max_model_len}",
           f"--gateway-arg=--api-key-file={key_file}", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    lines: collections.deque = collections.deque(maxlen=200_000)
    rest = grpc_addr = None
    metrics: dict[str, str] = {}
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if m := re.search(r"and (\S+) \(gRPC\)", line):
            grpc_addr = m.group(1).replace("0.0.0.0", "127.0.0.1")
        if m := re.search(r"ready — .*gateway (\S+)", line):
            rest = m.group(1).rstrip(",")
        if "pdmesh serve: metrics" in line:
            metrics = dict(re.findall(r"([\w-]+) (http://\S+?/metrics)", line))
            break
        if time.monotonic() > deadline:
            break
    if not (rest and grpc_addr):
        proc.kill()
        raise SystemExit("pdmesh serve did not start:\n" + "\n".join(lines))
    log = open(log_path, "w") if log_path else None  # noqa: SIM115 - the thread owns it

    def drain() -> None:
        if log:
            log.write("\n".join(lines) + "\n")
        for ln in proc.stdout:
            lines.append(ln.rstrip("\n"))
            if log:
                log.write(ln)
                log.flush()

    threading.Thread(target=drain, daemon=True).start()
    return Mesh(proc, rest, grpc_addr, lines, metrics)


def stop_serve(mesh: Mesh) -> int | None:
    if mesh.alive():
        mesh.proc.terminate()
        try:
            mesh.proc.wait(60)
        except subprocess.TimeoutExpired:
            mesh.proc.kill()
            mesh.proc.wait(10)
    return mesh.proc.returncode


def metric_sum(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(ln.split()[-1]) for ln in text.splitlines()
               if ln.startswith(name + " ") or ln.startswith(name + "{"))


def pages_in_use(mesh: Mesh) -> dict[str, float]:
    """Worker name -> KV pages in use (0 when idle and nothing leaked)."""
    return {name: metric_sum(url, "pdmesh_worker_kv_pages_used")
            for name, url in mesh.metrics.items() if name.startswith(("prefill", "decode",
                                                                      "colocated"))}


def wait_pages_free(mesh: Mesh, timeout: float) -> bool:
    """True once no worker has a KV page in use (requests end asynchronously)."""
    deadline = time.monotonic() + timeout
    while any(pages_in_use(mesh).values()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


# ---------------------------------------------------------------------------- counters

@dataclass
class Counts:
    requests: int = 0
    fault_5xx: int = 0
    past_deadline: int = 0
    transport: int = 0  # connection refused/reset: the server was not there
    statuses: collections.Counter = field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))

    def bad(self, kind: str, what: str) -> None:
        if len(self.examples[kind]) < 5:
            self.examples[kind].append(what[:600])


# ---------------------------------------------------------------------------- REST

def draw(strategy: st.SearchStrategy, n: int, derandomize: bool = False) -> list:
    """`n` examples of `strategy`, generated by hypothesis (no shrinking, no database;
    `derandomize`: the same examples every run)."""
    out: list = []

    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=derandomize)
    @given(strategy)
    def collect(example):
        out.append(example)

    collect()
    return out


def rest_cases(doc: dict, n: int, seed: int, key: str, derandomize: bool = False,
               near: float = 0.0) -> list[dict[str, Any]]:
    """`n` requests (aiohttp kwargs) generated by schemathesis from the OpenAPI document:
    every operation, positive and negative cases, mostly with the right key; a `near`
    fraction of the positive POSTs made near-valid (near_valid_json)."""
    import schemathesis
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_dict(doc)
    ops = [schema[path][verb.upper()] for path, verbs in doc["paths"].items()
           for verb in verbs]
    rnd = random.Random(seed)
    weights = {"POST": 8, "GET": 1}  # the POSTs have the bodies worth fuzzing
    plan = collections.Counter()
    for _ in range(n):
        op = rnd.choices(ops, [weights.get(o.method.upper(), 1) for o in ops])[0]
        # an operation with no parameters has no negative cases
        mode = rnd.choice([GenerationMode.POSITIVE, GenerationMode.NEGATIVE]) \
            if op.method.upper() == "POST" else GenerationMode.POSITIVE
        plan[(op.label, mode)] += 1
    out: list[dict[str, Any]] = []
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            count = plan[(op.label, mode)]
            if not count:
                continue
            try:
                got = draw(op.as_strategy(generation_mode=mode), count, derandomize)
            except Exception as e:  # noqa: BLE001 - a strategy that cannot generate
                print(f"  schemathesis: {op.label} {mode.value}: {e!r}", file=sys.stderr)
                got = []
            for case in got:
                req = _rest_request(case, rnd, key)
                if mode == GenerationMode.POSITIVE and rnd.random() < 2 * near:
                    near_valid_json(req, rnd)  # 2x: half the POSTs are positive
                out.append(req)
    # garbage bodies: not JSON, truncated JSON, binary, wrong content type
    for _ in range(max(1, n // 50)):
        path = rnd.choice(["/v1/chat/completions", "/v1/completions"])
        body = rnd.choice([
            rnd.randbytes(rnd.randrange(0, 200)),
            b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2'[
                :rnd.randrange(1, 60)],
            b"[" * rnd.randrange(1, 3000),
            b'{"prompt": ' + b"[" * 2000 + b"]" * 2000 + b"}",
        ])
        out.append({"method": "POST", "path": path, "data": body,
                    "headers": {"Authorization": f"Bearer {key}",
                                "Content-Type": rnd.choice(["application/json",
                                                            "text/plain", ""])}})
    rnd.shuffle(out)
    return out[:max(n, 1)]


def _rest_request(case, rnd: random.Random, key: str) -> dict[str, Any]:
    kw = case.as_transport_kwargs(base_url="")
    headers = {k: v for k, v in (kw.get("headers") or {}).items()
               if k.lower() not in ("user-agent", "x-schemathesis-testcaseid")}
    r = rnd.random()
    if r < 0.9:
        headers["Authorization"] = f"Bearer {key}"  # else: generated, wrong or none
    elif r < 0.95:
        headers.pop("Authorization", None)
    req = {"method": kw["method"], "path": case.formatted_path, "headers": headers,
           "params": kw.get("params") or None}
    if "json" in kw:
        req["json"] = kw["json"]
    elif kw.get("data") is not None:
        req["data"] = kw["data"]
    return req


async def rest_send(session: aiohttp.ClientSession, base: str, req: dict, deadline: float,
                    counts: Counts) -> None:
    kw = {k: v for k, v in req.items() if k not in ("method", "path")}
    if kw.get("params") is None:
        kw.pop("params", None)
    counts.requests += 1
    try:
        async with session.request(req["method"], base + req["path"],
                                   timeout=aiohttp.ClientTimeout(total=deadline),
                                   **kw) as resp:
            body = await resp.read()
            counts.statuses[f"HTTP {resp.status}"] += 1
            if resp.status >= 500:
                counts.fault_5xx += 1
                counts.bad("5xx", f"{req['method']} {req['path']} {_short(req)} -> "
                                  f"{resp.status} {body[:300]!r}")
    except asyncio.TimeoutError:
        counts.past_deadline += 1
        counts.bad("past deadline", f"{req['method']} {req['path']} {_short(req)}")
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
        counts.transport += 1
        counts.bad("transport", f"{req['method']} {req['path']} {_short(req)}: {e!r}")
    except (ValueError, TypeError) as e:  # the client could not even send it (bad header)
        counts.requests -= 1
        counts.statuses["unsendable"] += 1


def _short(req: dict) -> str:
    return repr(req.get("json", req.get("data")))[:300]


# ---------------------------------------------------------------------------- gRPC

_F = _d.FieldDescriptor
_INT_RANGE = {
    _F.TYPE_INT32: (-(1 << 31), (1 << 31) - 1), _F.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
    _F.TYPE_SFIXED32: (-(1 << 31), (1 << 31) - 1), _F.TYPE_UINT32: (0, (1 << 32) - 1),
    _F.TYPE_FIXED32: (0, (1 << 32) - 1), _F.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    _F.TYPE_SINT64: (-(1 << 63), (1 << 63) - 1), _F.TYPE_SFIXED64: (-(1 << 63), (1 << 63) - 1),
    _F.TYPE_UINT64: (0, (1 << 64) - 1), _F.TYPE_FIXED64: (0, (1 << 64) - 1),
}
# words the gateway looks for, so generated messages get past the first checks often
_WORDS = ["", "default", "user", "assistant", "system", "tool", "text", "hello",
          "The capital of France is", "\n", "<|im_end|>", "<|im_start|>"]
_JSON = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers(-10, 100_000)
    | st.text(max_size=20) | st.sampled_from(_WORDS),
    lambda kids: st.lists(kids, max_size=4)
    | st.dictionaries(st.sampled_from(["type", "text", "role", "content"]) | st.text(
        max_size=5), kids, max_size=3),
    max_leaves=12)


def _scalar(f: _d.FieldDescriptor) -> st.SearchStrategy:
    if f.type in _INT_RANGE:
        lo, hi = _INT_RANGE[f.type]
        small = st.integers(max(lo, -3), min(hi, 300))
        if "token" in f.name:  # token ids: mostly in the vocabulary, sometimes not
            small = st.integers(0, 49_151) | st.integers(49_152, 1 << 20)
        return small | st.integers(lo, hi)
    if f.type in (_F.TYPE_DOUBLE, _F.TYPE_FLOAT):
        return st.floats(-3, 3) | st.floats(allow_nan=True, allow_infinity=True,
                                            width=32 if f.type == _F.TYPE_FLOAT else 64)
    if f.type == _F.TYPE_BOOL:
        return st.booleans()
    if f.type == _F.TYPE_STRING:
        return st.sampled_from(_WORDS) | st.text(max_size=40) | st.text(max_size=400)
    if f.type == _F.TYPE_BYTES:
        return st.binary(max_size=40)
    if f.type == _F.TYPE_ENUM:
        return st.sampled_from([v.number for v in f.enum_type.values]) | st.integers(-5, 99)
    raise TypeError(f.type)


def message_strategy(desc: _d.Descriptor, depth: int = 0) -> st.SearchStrategy:
    """A hypothesis strategy for any message of type `desc`: each field absent or set to
    any value of its type (repeated: a short list; messages: recursively, 3 deep)."""
    cls = message_factory.GetMessageClass(desc)
    parts: dict[str, st.SearchStrategy] = {}
    for f in desc.fields:
        if f.message_type is not None:
            full = f.message_type.full_name
            if full == "google.protobuf.Value":
                value = _JSON
            elif full in ("google.protobuf.Struct", "google.protobuf.ListValue"):
                value = _JSON
            elif f.message_type.GetOptions().map_entry:
                value = st.dictionaries(_scalar(f.message_type.fields_by_name["key"]),
                                        _JSON, max_size=3)
            elif depth >= 3:
                continue
            else:
                value = message_strategy(f.message_type, depth + 1)
        elif f.name == "model":  # mostly the served model, so the request goes further
            value = st.one_of(st.just(""), st.just("default"), st.just(""),
                              st.just("default"), _scalar(f))
        elif f.name == "role":
            value = st.one_of(st.just("user"), st.just("assistant"), st.just("user"),
                              st.just("system"), _scalar(f))
        else:
            value = _scalar(f)
        if f.is_repeated and not (f.message_type and f.message_type.GetOptions().map_entry):
            value = st.lists(value, max_size=6) | st.lists(value, min_size=20, max_size=200)
        parts[f.name] = value

    def build(values: dict[str, Any]):
        msg = cls()
        for name, v in values.items():
            _set(msg, desc.fields_by_name[name], v)
        return msg

    return st.fixed_dictionaries({}, optional=parts).map(build)


def _set(msg, f: _d.FieldDescriptor, v: Any) -> None:
    from google.protobuf import json_format, struct_pb2

    if f.message_type is not None and f.message_type.full_name in (
            "google.protobuf.Value", "google.protobuf.Struct", "google.protobuf.ListValue"):
        target = getattr(msg, f.name)
        items = v if f.is_repeated else [v]
        for item in items:
            sub = target.add() if f.is_repeated else target
            if f.message_type.full_name == "google.protobuf.Struct":
                if isinstance(item, dict):
                    json_format.ParseDict(item, sub)
            elif f.message_type.full_name == "google.protobuf.ListValue":
                if isinstance(item, list):
                    json_format.ParseDict(item, sub)
            else:
                sub.CopyFrom(json_format.ParseDict(item, struct_pb2.Value()))
        return
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        getattr(msg, f.name).update(v)
        return
    if f.is_repeated:
        if f.message_type is not None:
            for item in v:
                getattr(msg, f.name).add().CopyFrom(item)
        else:
            getattr(msg, f.name).extend(v)
    elif f.message_type is not None:
        getattr(msg, f.name).CopyFrom(v)
    else:
        setattr(msg, f.name, v)


def gateway_methods() -> list[_d.MethodDescriptor]:
    from pdmesh.v1 import gateway_pb2 as gpb

    return list(gpb.DESCRIPTOR.services_by_name["Gateway"].methods)


PROMPTS = ["The capital of France is", "1, 2, 3,", "hi", "Write a haiku about the sea.",
           "<|im_start|>user\nhi<|im_end|>"]


def near_valid(msg, rnd: random.Random) -> None:
    """Make a generated request's prompt and model valid (and, mostly, max_tokens small),
    keeping every other generated field: the sampling values then reach the workers'
    engines, where a bad one does the most harm."""
    name = msg.DESCRIPTOR.name
    small = rnd.random() < 0.7
    if name in ("GenerateRequest", "ChatRequest"):
        msg.model = ""
        if name == "GenerateRequest":
            msg.ClearField("token_ids")
            msg.text = rnd.choice(PROMPTS)
        else:
            del msg.messages[:]
            msg.messages.add(role="user").content.string_value = rnd.choice(PROMPTS)
        if small:
            msg.sampling_params.max_tokens = rnd.randint(1, 16)
            msg.sampling_params.min_tokens = min(msg.sampling_params.min_tokens, 1)
    elif name in ("ChatCompletionRequest", "CompletionRequest"):
        msg.model = "default"
        msg.ClearField("n")
        if name == "ChatCompletionRequest":
            del msg.messages[:]
            msg.messages.add(role="user").content.string_value = rnd.choice(PROMPTS)
            msg.ClearField("max_completion_tokens")
        else:
            msg.prompt.string_value = rnd.choice(PROMPTS)
        if small:
            msg.max_tokens = rnd.randint(1, 16)
            msg.min_tokens = min(msg.min_tokens, 1)


def near_valid_json(req: dict, rnd: random.Random) -> None:
    """near_valid for a REST body (a JSON object from a positive schemathesis case)."""
    body = req.get("json")
    if not isinstance(body, dict) or req["method"] != "POST":
        return
    body["model"] = "default"
    body.pop("n", None)
    if req["path"].endswith("/chat/completions"):
        body["messages"] = [{"role": "user", "content": rnd.choice(PROMPTS)}]
        body.pop("max_completion_tokens", None)
    else:
        body["prompt"] = rnd.choice(PROMPTS)
    if rnd.random() < 0.7:
        body["max_tokens"] = rnd.randint(1, 16)
        if isinstance(body.get("min_tokens"), int):
            body["min_tokens"] = min(body["min_tokens"], 1)


def grpc_cases(n: int, seed: int, garbage: float, derandomize: bool = False,
               near: float = 0.0) -> list[tuple[_d.MethodDescriptor, bytes, str]]:
    """`n` (method, serialized request, kind) for the Gateway's RPCs: hypothesis messages,
    a `near` fraction made near-valid (near_valid), and a `garbage` fraction of raw bytes
    (random, or a message with bytes flipped/cut)."""
    rnd = random.Random(seed)
    methods = gateway_methods()
    weights = [1 if m.name in ("ListModels", "Health") else 6 for m in methods]
    plan = collections.Counter(rnd.choices(methods, weights, k=n))
    out: list[tuple[_d.MethodDescriptor, bytes, str]] = []
    for m, count in plan.items():
        for msg in draw(message_strategy(m.input_type), count, derandomize):
            r = rnd.random()
            if r < garbage:
                out.append((m, _mangle(msg.SerializeToString(), rnd), "garbage"))
            elif r < garbage + near:
                near_valid(msg, rnd)
                out.append((m, msg.SerializeToString(), "near-valid"))
            else:
                out.append((m, msg.SerializeToString(), "message"))
    rnd.shuffle(out)
    return out


def _mangle(data: bytes, rnd: random.Random) -> bytes:
    r = rnd.random()
    if r < 0.3 or not data:
        return rnd.randbytes(rnd.randrange(1, 64))
    b = bytearray(data)
    if r < 0.65:
        for _ in range(rnd.randrange(1, 4)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        return bytes(b)
    return bytes(b[:rnd.randrange(len(b))]) + rnd.randbytes(rnd.randrange(0, 4))


async def grpc_send(channel: grpc.aio.Channel, method: _d.MethodDescriptor, data: bytes,
                    kind: str, key: str, deadline: float, counts: Counts,
                    rnd: random.Random) -> None:
    path = f"/{GATEWAY}/{method.name}"
    md = [("authorization", f"Bearer {key}")] if rnd.random() < 0.95 else \
        [("authorization", "Bearer wrong")] if rnd.random() < 0.5 else []
    counts.requests += 1
    try:
        if method.server_streaming:
            call = channel.unary_stream(path)(data, timeout=deadline, metadata=md)
            async for _ in call:
                pass
            code = await call.code()
        else:
            await channel.unary_unary(path)(data, timeout=deadline, metadata=md)
            code = grpc.StatusCode.OK
        counts.statuses[f"gRPC {code.name}"] += 1
    except grpc.aio.AioRpcError as e:
        code = e.code()
        counts.statuses[f"gRPC {code.name}"] += 1
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            counts.past_deadline += 1
            counts.bad("past deadline", f"{method.name} {kind} {data[:200]!r}")
        elif code in SERVER_FAULT:
            counts.fault_5xx += 1
            counts.bad("5xx", f"{method.name} {kind} {data[:300]!r} -> {code.name}: "
                              f"{e.details()}")


# ---------------------------------------------------------------------------- checks

def greedy_rest(rest: str, key: str) -> str:
    import json

    req = urllib.request.Request(
        f"http://{rest}/v1/completions", method="POST",
        data=json.dumps({"model": "default", "prompt": GREEDY_PROMPT, "max_tokens": 8,
                         "temperature": 0}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["choices"][0]["text"]


def greedy_grpc(addr: str, key: str) -> list[int]:
    from pdmesh.v1 import common_pb2 as cpb
    from pdmesh.v1 import gateway_pb2 as gpb
    from pdmesh.v1 import gateway_pb2_grpc as gpb_grpc

    with grpc.insecure_channel(addr) as ch:
        stub = gpb_grpc.GatewayStub(ch)
        ids: list[int] = []
        for r in stub.Generate(gpb.GenerateRequest(
                text=GREEDY_PROMPT, sampling_params=cpb.SamplingParams(
                    max_tokens=8, temperature=0)), metadata=[("authorization",
                                                              f"Bearer {key}")],
                timeout=120):
            ids.extend(r.token_ids)
        return ids


def wait_routable(rest: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{rest}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except Exception:  # noqa: BLE001 - 503 until a route exists
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the mesh never became routable")
        time.sleep(0.2)


# ---------------------------------------------------------------------------- the run

async def fire(mesh: Mesh, cases: list, concurrency: int, deadline: float, counts: Counts,
               key: str, seed: int) -> None:
    sem = asyncio.Semaphore(concurrency)
    rnd = random.Random(seed)
    base = f"http://{mesh.rest}"
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session, \
            grpc.aio.insecure_channel(mesh.grpc) as channel:
        async def one(case):
            async with sem:
                if isinstance(case, dict):
                    await rest_send(session, base, case, deadline, counts)
                else:
                    await grpc_send(channel, *case, key, deadline, counts, rnd)

        await asyncio.gather(*(one(c) for c in cases))


def run(args) -> int:
    with tempfile.NamedTemporaryFile("w", suffix=".key", delete=False) as f:
        f.write(API_KEY)
        key_file = f.name
    t_start = time.monotonic()
    mesh = start_serve(args.max_model_len, args.serve_arg, key_file, args.serve_log)
    # SIGTERM (e.g. `kill`): stop the mesh too, through the finally below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"pdmesh serve up: REST {mesh.rest}, gRPC {mesh.grpc}", flush=True)
    try:
        wait_routable(mesh.rest)
        with urllib.request.urlopen(f"http://{mesh.rest}/openapi.json", timeout=10) as r:
            import json
            doc = json.load(r)
        ref_text, ref_ids = greedy_rest(mesh.rest, API_KEY), greedy_grpc(mesh.grpc, API_KEY)
        print(f"greedy reference: {ref_text!r} {ref_ids}", flush=True)
        counts = {"REST": Counts(), "gRPC": Counts()}
        sent, batch_no = 0, 0
        t0 = time.monotonic()
        loop_deadline = t0 + args.max_seconds if args.max_seconds else None
        while sent < args.requests:
            if loop_deadline and time.monotonic() > loop_deadline:
                print("time budget spent; stopping", flush=True)
                break
            n = min(args.batch, args.requests - sent)
            seed = args.seed + batch_no
            rest = rest_cases(doc, n // 2, seed, API_KEY, near=args.near_valid)
            grpc_ = grpc_cases(n - n // 2, seed, args.garbage, near=args.near_valid)
            for kind, cases in (("REST", rest), ("gRPC", grpc_)):
                asyncio.run(fire(mesh, cases, args.concurrency, args.deadline, counts[kind],
                                 API_KEY, seed))
            sent += len(rest) + len(grpc_)
            batch_no += 1
            c = counts["REST"], counts["gRPC"]
            print(f"[{time.monotonic() - t0:7.0f}s] {sent} sent: "
                  f"REST {c[0].requests} (5xx {c[0].fault_5xx}, past deadline "
                  f"{c[0].past_deadline}), gRPC {c[1].requests} (5xx {c[1].fault_5xx}, "
                  f"past deadline {c[1].past_deadline}); serve alive {mesh.alive()}",
                  flush=True)
            if not mesh.alive():
                break
            try:  # between batches: still serving the greedy prompt? (a hang stops the run)
                same = greedy_rest(mesh.rest, API_KEY) == ref_text
            except Exception as e:  # noqa: BLE001 - timed out or refused
                same = False
                print(f"the mesh stopped serving: {e!r}", flush=True)
            if not same:
                print("the greedy prompt failed between batches; stopping", flush=True)
                break
        elapsed = time.monotonic() - t0
        alive = mesh.alive()
        crashes = len(mesh.exited_children()) + (0 if alive else 1)
        after_text = after_ids = None
        leaked: dict[str, float] = {}
        if alive:
            after_text, after_ids = greedy_rest(mesh.rest, API_KEY), greedy_grpc(mesh.grpc,
                                                                                 API_KEY)
            wait_pages_free(mesh, 10)
            leaked = pages_in_use(mesh)
        tracebacks = mesh.tracebacks()
    finally:
        rc = stop_serve(mesh)
        os.unlink(key_file)
    ok_greedy = after_text == ref_text and after_ids == ref_ids
    table = report(counts, crashes, tracebacks, ref_text, ref_ids, after_text, after_ids,
                   leaked, elapsed, rc)
    print(table, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    bad = (sum(c.fault_5xx + c.past_deadline + c.transport for c in counts.values())
           + crashes + (0 if ok_greedy else 1) + (1 if any(leaked.values()) else 0))
    print(f"total wall time {time.monotonic() - t_start:.0f} s", flush=True)
    return 1 if bad else 0


def report(counts: dict[str, Counts], crashes: int, tracebacks: int, ref_text, ref_ids,
           after_text, after_ids, leaked: dict, elapsed: float, rc) -> str:
    rows = ["| | requests | 5xx | past deadline | transport errors | statuses |",
            "|---|---:|---:|---:|---:|---|"]
    for kind, c in counts.items():
        st_ = ", ".join(f"{k} {v}" for k, v in sorted(c.statuses.items()))
        rows.append(f"| {kind} | {c.requests} | {c.fault_5xx} | {c.past_deadline} | "
                    f"{c.transport} | {st_} |")
    tot = sum(c.requests for c in counts.values())
    rows.append(f"| **all** | **{tot}** | **{sum(c.fault_5xx for c in counts.values())}** | "
                f"**{sum(c.past_deadline for c in counts.values())}** | "
                f"**{sum(c.transport for c in counts.values())}** | |")
    lines = ["\n".join(rows), "",
             f"- crashes (serve children that exited, or serve itself): {crashes}",
             f"- tracebacks in the mesh's log: {tracebacks}",
             f"- fuzzing wall time: {elapsed:.0f} s ({tot / max(elapsed, 1e-9):.0f} requests/s)",
             f"- greedy prompt {GREEDY_PROMPT!r} before: REST {ref_text!r}, gRPC {ref_ids}",
             f"- greedy prompt after:  REST {after_text!r}, gRPC {after_ids} -> "
             f"{'same' if (after_text, after_ids) == (ref_text, ref_ids) else 'DIFFERENT'}",
             f"- KV pages in use per worker after the run (idle): {leaked}",
             f"- pdmesh serve exit code on SIGTERM: {rc}"]
    for kind, c in counts.items():
        for what, ex in c.examples.items():
            lines.append(f"- {kind} {what} examples:")
            lines.extend(f"    - `{e}`" for e in ex)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100_000, help="generated requests in all")
    p.add_argument("--batch", type=int, default=4000, help="requests generated per batch")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--deadline", type=float, default=60.0, help="seconds per request")
    p.add_argument("--garbage", type=float, default=0.1,
                   help="fraction of gRPC requests sent as raw garbage bytes")
    p.add_argument("--near-valid", type=float, default=0.25,
                   help="fraction of requests whose prompt and model are made valid (the "
                        "other fields stay generated), so their sampling values reach the "
                        "engines")
    p.add_argument("--max-model-len", type=int, default=64,
                   help="the gateway's context length: bounds what an accepted request "
                        "generates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=0,
                   help="stop sending new batches after this long (0: no limit)")
    p.add_argument("--serve-arg", action="append", default=[],
                   help="extra flag for pdmesh serve (repeatable)")
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--serve-log", default=os.path.join(tempfile.gettempdir(),
                                                       "pdmesh-fuzz-serve.log"),
                   help="pdmesh serve's output goes here")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
