"""The gateway end to end over fake workers: a real registry process, a real `pdmesh
gateway` process, fake Decode/Prefill servers in this process (tests/gateway_fakes.py).
Clients: the `openai` package, raw HTTP, grpcurl, pdmesh.client."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx2 as httpx  # the HTTP client the openai package itself uses
import openai
import pytest

from gateway_fakes import PREFILL_FAILS, SLOW, FakeMesh, start_worker, stop_workers
from pdmesh.client import AsyncClient, Client
from pdmesh.runtime.loader import resolve_model_path
from pdmesh.runtime.tokenizer import Tokenizer
from pdmesh.v1 import registry_pb2 as rpb

KEY = "sk-test"
REPLY = "Paris is the capital of France. It is a city of art, food and light."
MAX_LEN = 512
HELLO = [{"role": "user", "content": "What is the capital of France?"}]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def spawn(args, pattern):
    proc = subprocess.Popen([sys.executable, "-m", "pdmesh.cli", *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:
        if m := re.search(pattern, line):
            return proc, m
    raise RuntimeError(f"{args[0]} exited ({proc.wait()}) before it was ready")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_path(resolve_model_path("default"))


@pytest.fixture(scope="module")
def mesh(tok):
    reg, m = spawn(["registry", "--host", "127.0.0.1", "--port", "0",
                    "--heartbeat-interval", "0.3"], r"listening on (\S+)")
    registry = m.group(1)
    gw, m = spawn(["gateway", "--registry", registry, "--host", "127.0.0.1", "--port", "0",
                   "--grpc-port", "0", "--api-key", KEY, "--max-model-len", str(MAX_LEN)],
                  r"listening on (\S+) \(REST\) and (\S+) \(gRPC\)")
    fake = FakeMesh(tok.encode(REPLY, add_special_tokens=False))
    fake.registry, fake.rest, fake.grpc = registry, m.group(1), m.group(2)
    fake.workers = [start_worker(fake, role, registry)
                    for role in (rpb.WORKER_ROLE_PREFILL, rpb.WORKER_ROLE_DECODE)]
    wait_health(fake, 200)
    yield fake
    stop_workers(fake)
    for p in (gw, reg):
        p.terminate()
        assert p.wait(10) == 0


def wait_health(fake, status, timeout=10):
    deadline = time.monotonic() + timeout
    while httpx.get(f"http://{fake.rest}/health").status_code != status:
        assert time.monotonic() < deadline, f"/health never answered {status}"
        time.sleep(0.05)


@pytest.fixture
def oai(mesh):
    return openai.OpenAI(base_url=f"http://{mesh.rest}/v1", api_key=KEY, max_retries=0)


def test_chat_completions(oai, tok, mesh):
    r = oai.chat.completions.create(model="default", messages=HELLO, max_tokens=5)
    assert r.choices[0].message.content == tok.decode(mesh.reply_ids[:5])
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    prompt = len(tok.apply_chat_template(HELLO))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        prompt, 5, prompt + 5)
    assert r.object == "chat.completion" and isinstance(r.created, int)
    sent = mesh.requests[-1]
    assert list(sent.token_ids) == tok.apply_chat_template(HELLO) and sent.prefill_address


def test_decode_that_ignores_n_fails_the_request(oai, mesh):
    """n=2 reaches both legs as SamplingParams.n; a decode worker that answers one choice
    only (these fakes know no n) fails the request (503) instead of an empty choice."""
    with pytest.raises(openai.InternalServerError) as e:
        oai.chat.completions.create(model="default", messages=HELLO, n=2, max_tokens=3)
    assert e.value.status_code == 503
    assert mesh.requests[-1].sampling_params.n == 2


def test_chat_streaming_with_usage_and_logprobs(oai, tok, mesh):
    chunks = list(oai.chat.completions.create(
        model="default", messages=HELLO, max_tokens=8, stream=True, logprobs=True,
        top_logprobs=2, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tok.decode(mesh.reply_ids[:8])
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 8
    lps = [lp for c in chunks if c.choices and c.choices[0].logprobs
           for lp in c.choices[0].logprobs.content]
    assert len(lps) == 8 and lps[0].logprob == -0.5 and len(lps[0].top_logprobs) == 2


def test_stop_string_truncates(oai, mesh):
    r = oai.chat.completions.create(model="default", messages=HELLO, max_tokens=30,
                                    stop=[" of"], extra_body={"ignore_eos": True,
                                                              "min_tokens": 1})
    assert r.choices[0].message.content == "Paris is the capital"
    assert r.choices[0].finish_reason == "stop"
    assert list(mesh.requests[-1].sampling_params.stop) == [" of"]
    assert mesh.requests[-1].sampling_params.ignore_eos


def test_completions(oai, tok, mesh):
    r = oai.completions.create(model="default", prompt="The capital of France is",
                               max_tokens=4, echo=True)
    assert r.choices[0].text == "The capital of France is" + tok.decode(mesh.reply_ids[:4])
    assert r.usage.prompt_tokens == len(tok.encode("The capital of France is"))
    chunks = list(oai.completions.create(model="default", prompt=[1, 2, 3], max_tokens=6,
                                         stream=True, logprobs=1,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == tok.decode(
        mesh.reply_ids[:6])
    assert chunks[-1].usage.prompt_tokens == 3 and chunks[-1].usage.total_tokens == 9
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices) == 6
    assert list(mesh.requests[-1].token_ids) == [1, 2, 3]
    assert oai.models.list().data[0].id == "default"


def post(mesh, body, path="/v1/chat/completions", key=KEY, raw=None):
    return httpx.post(f"http://{mesh.rest}{path}", content=raw,
                      json=None if raw is not None else body,
                      headers={"Authorization": f"Bearer {key}"} if key else {})


@pytest.mark.parametrize("body,raw,status,needle", [
    (None, b"{not json", 400, "Invalid request body"),
    ({"model": "gpt-9", "messages": HELLO}, None, 404, "gpt-9"),
    ({"model": "default", "messages": "hi"}, None, 400, "messages"),
    ({"model": "default", "messages": HELLO, "max_tokens": "many"}, None, 400, "max_tokens"),
    ({"model": "default", "messages": []}, None, 400, "messages"),
    ({"model": "default", "messages": HELLO, "max_tokens": -1}, None, 400, "max_tokens"),
    ({"model": "default", "messages": [{"role": "user", "content": "hi " * 600}]}, None, 400,
     "maximum context length is 512"),
    ({"model": "default", "messages": HELLO, "max_tokens": 600}, None, 400, "context length"),
])
def test_bad_requests_get_openai_errors(mesh, oai, body, raw, status, needle):
    r = post(mesh, body, raw=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and {"type", "param", "code"} <= set(err)
    assert oai.chat.completions.create(model="default", messages=HELLO, max_tokens=2)


def test_auth_and_unknown_route(mesh):
    for key in (None, "wrong"):
        r = post(mesh, {"model": "default", "messages": HELLO}, key=key)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    r = httpx.get(f"http://{mesh.rest}/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    assert httpx.get(f"http://{mesh.rest}/health").json() == {"status": "ok"}


def test_prefill_failure_fails_request_and_cancels_decode(oai, mesh):
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        oai.chat.completions.create(model="default", messages=HELLO, seed=PREFILL_FAILS)
    # the client gets a request id, not the worker's address (tests/test_api_errors.py)
    assert e.value.status_code == 503 and "Request id req-" in e.value.message
    assert "127.0.0.1" not in e.value.message and time.monotonic() - t0 < 5
    room = mesh.requests[-1].room
    deadline = time.monotonic() + 5
    while room not in mesh.cancelled:  # the decode leg was cancelled, not left waiting
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_client_disconnect_cancels_the_legs(oai, mesh):
    stream = oai.chat.completions.create(model="default", messages=HELLO, seed=SLOW,
                                         max_tokens=100, stream=True)
    next(iter(stream))
    room = mesh.requests[-1].room
    stream.close()
    deadline = time.monotonic() + 5
    while room not in mesh.cancelled:
        assert time.monotonic() < deadline, "the decode leg outlived its client"
        time.sleep(0.05)


def test_grpc_clients_and_grpcurl(mesh, tok):
    with Client(mesh.grpc, api_key=KEY) as c:
        assert "".join(c.chat(HELLO, max_tokens=5)) == tok.decode(mesh.reply_ids[:5])
        last = list(c.generate_stream([5, 6, 7], max_tokens=3))[-1]
        assert last.usage.completion_tokens == 3 and last.finish_reason == 2
        with pytest.raises(grpc.RpcError) as e:
            list(Client(mesh.grpc).chat(HELLO))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

    async def achat():
        async with AsyncClient(mesh.grpc, api_key=KEY) as ac:
            return "".join([t async for t in ac.chat(HELLO, max_tokens=4)])
    assert asyncio.run(achat()) == tok.decode(mesh.reply_ids[:4])

    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).with_name("grpcurl"))
    run = lambda *a: subprocess.run([grpcurl, "-plaintext", *a], capture_output=True,
                                    text=True, timeout=30, check=True).stdout
    assert "pdmesh.v1.Gateway" in run(mesh.grpc, "list")
    assert "rpc Generate" in run(mesh.grpc, "describe", "pdmesh.v1.Gateway")
    out = run("-H", f"authorization: Bearer {KEY}", "-d",
              '{"text": "Hello", "return_text": true, "sampling_params": {"max_tokens": 3}}',
              mesh.grpc, "pdmesh.v1.Gateway/Generate")
    msgs, pos, dec = [], 0, json.JSONDecoder()
    while out[pos:].strip():  # grpcurl prints one JSON object per streamed message
        msg, end = dec.raw_decode(out[pos:].lstrip())
        msgs.append(msg)
        pos = len(out) - len(out[pos:].lstrip()) + end
    assert len(msgs) == 3, out
    assert msgs[-1]["finish_reason"] == "FINISH_REASON_LENGTH", out


def test_workers_join_and_leave_at_run_time(oai, mesh):
    for server, client in mesh.workers:
        client.close()  # deregister: LEFT
        server.stop(0)
    mesh.workers.clear()
    wait_health(mesh, 503)
    with pytest.raises(openai.APIStatusError) as e:
        oai.chat.completions.create(model="default", messages=HELLO)
    assert e.value.status_code == 503 and "no worker" in e.value.message
    server, client = start_worker(mesh, rpb.WORKER_ROLE_COLOCATED, mesh.registry)
    mesh.workers.append((server, client))
    wait_health(mesh, 200)
    r = oai.chat.completions.create(model="default", messages=HELLO, max_tokens=3)
    assert r.usage.completion_tokens == 3
    assert mesh.requests[-1].prefill_address == ""  # colocated: decode leg only
