"""Traces and metrics end to end: `pdmesh serve` (real processes, Mooncake tcp), the
`openai` client, the trace file every service appends to, every service's /metrics."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh_procs import metrics_urls, start_serve, terminate, wait_until
from pdmesh.telemetry.otlp_file import read_spans

# long enough that prefill dominates TTFT (the parts must add up within 10%)
PROMPT = ("Summarise the history of the printing press in Europe, from Gutenberg's "
          "movable type to the rotary presses of the nineteenth century, naming the "
          "people, the cities and the inventions that mattered most. ") * 3
SERVICES = {"pdmesh-gateway", "pdmesh-prefill", "pdmesh-decode"}


def chat(client, max_tokens: int = 6, **kw):
    return client.chat.completions.create(
        model="default", max_tokens=max_tokens, temperature=0,
        messages=[{"role": "user", "content": PROMPT}], extra_body={"ignore_eos": True}, **kw)


def routable(url: str) -> bool:
    """The gateway has a prefill + decode pair (its /health answers 200)."""
    try:
        return urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5).status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def traced_mesh(tmp_path_factory):
    trace_file = str(tmp_path_factory.mktemp("traces") / "spans.jsonl")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # children inherit: export within 0.1 s
    try:
        proc, url, lines = start_serve("--trace-file", trace_file,
                                       "--worker-arg=--log-interval=0.5")
    finally:
        del os.environ["OTEL_BSP_SCHEDULE_DELAY"]
    assert wait_until(lambda: routable(url), 30)
    yield url, trace_file, lines
    terminate(proc, 60)


def request_trace(trace_file: str):
    """(trace id, spans by name) of the one trace holding a chat request."""
    spans = read_spans(trace_file)
    ids = {s.trace_id for s in spans if s.attributes.get("gen_ai.operation.name") == "chat"}
    if len(ids) != 1:
        return None
    tid = ids.pop()
    mine = [s for s in spans if s.trace_id == tid]
    return tid, mine, spans


def test_one_trace_across_the_mesh(traced_mesh):
    url, trace_file, lines = traced_mesh
    client = openai.OpenAI(base_url=url, api_key="none")
    resp = chat(client, extra_headers={
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    assert resp.usage.completion_tokens == 6

    def complete():  # every service exported its part of the request (each exports on
        got = request_trace(trace_file)  # its own schedule: a loaded host lags)
        names = {(s.name, s.service.removeprefix("pdmesh-")) for s in got[1]} if got else set()
        return got if TREE_SPANS <= names else None
    assert wait_until(complete, 20), open(trace_file).read()[-3000:]
    tid, mine, everything = complete()
    # the caller's traceparent is honoured: the request joins the client's trace
    assert tid == "0af7651916cd43dd8448eb211c80319c"
    assert {s.service for s in mine} == SERVICES
    # none of the request's spans leaked into another trace
    request_names = {s.name for s in mine}
    assert all(s.trace_id == tid for s in everything if s.name in request_names
               and s.name not in ("/pdmesh.v1.Registry/Register",))
    # the registry exported its own spans (membership: not on the request path)
    assert any(s.service == "pdmesh-registry" and s.name.endswith("/Register")
               for s in everything)
    check_tree(mine, resp.usage.prompt_tokens)


TREE_SPANS = {(n, svc) for svc, names in {
    "gateway": ("POST /v1/chat/completions", "chat default", "tokenize", "route", "completion",
                "/pdmesh.v1.Decode/Generate", "/pdmesh.v1.Prefill/Prefill"),
    "decode": ("/pdmesh.v1.Decode/Generate", "decode.admission", "decode.first_step",
               "/pdmesh.v1.Prefill/Transfer"),
    "prefill": ("/pdmesh.v1.Prefill/Transfer", "kv.transfer", "/pdmesh.v1.Prefill/Prefill",
                "prefill.queue", "prefill.compute")}.items() for n in names}


def check_tree(spans, prompt_tokens: int) -> None:
    by_id = {s.span_id: s for s in spans}
    one = {(s.name, s.service): s for s in spans}
    assert len(one) == len(spans), "a span appears twice in one request's trace"

    def get(name, service):
        return one[(name, f"pdmesh-{service}")]

    def parent(name, service):
        return by_id[get(name, service).parent_id]

    root = get("POST /v1/chat/completions", "gateway")
    assert root.parent_id == "b7ad6b7169203331"  # the client's span
    chat = get("chat default", "gateway")
    assert by_id[chat.parent_id] is root
    for name in ("tokenize", "route", "completion", "/pdmesh.v1.Decode/Generate",
                 "/pdmesh.v1.Prefill/Prefill"):
        assert parent(name, "gateway") is chat, name
    # gateway -> decode -> prefill (Transfer) -> the KV write
    assert parent("/pdmesh.v1.Decode/Generate", "decode") is get("/pdmesh.v1.Decode/Generate", "gateway")
    dec = get("/pdmesh.v1.Decode/Generate", "decode")
    for name in ("decode.admission", "decode.first_step", "/pdmesh.v1.Prefill/Transfer"):
        assert parent(name, "decode") is dec, name
    assert parent("/pdmesh.v1.Prefill/Transfer", "prefill") is get("/pdmesh.v1.Prefill/Transfer", "decode")
    assert parent("kv.transfer", "prefill") is get("/pdmesh.v1.Prefill/Transfer", "prefill")
    # gateway -> prefill (Prefill) -> queue, compute
    pre = get("/pdmesh.v1.Prefill/Prefill", "prefill")
    assert by_id[pre.parent_id] is get("/pdmesh.v1.Prefill/Prefill", "gateway")
    for name in ("prefill.queue", "prefill.compute"):
        assert parent(name, "prefill") is pre, name
    # time runs forward along the path (one machine, one clock)
    q, c, kv = get("prefill.queue", "prefill"), get("prefill.compute", "prefill"), get("kv.transfer", "prefill")
    assert q.end_ns <= c.start_ns + 1000 and c.end_ns <= kv.start_ns
    assert kv.end_ns <= get("decode.first_step", "decode").start_ns + 5_000_000
    # the transfer span carries what moved
    pages = math.ceil(prompt_tokens / 16)
    assert kv.attributes["pdmesh.kv.pages"] == pages
    assert kv.attributes["pdmesh.kv.bytes"] == pages * bytes_per_page()
    assert kv.attributes["pdmesh.kv.path"] == "shm"
    assert kv.attributes["pdmesh.kv.descriptors"] >= 1 and kv.attributes["pdmesh.kv.gb_per_s"] > 0
    # GenAI semantic conventions on the request span
    assert chat.attributes["gen_ai.request.model"] == "default"
    assert chat.attributes["gen_ai.usage.input_tokens"] == prompt_tokens
    assert chat.attributes["gen_ai.usage.output_tokens"] == 6
    assert chat.attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert "pd: prefill round_robin of 1" in get("route", "gateway").attributes["pdmesh.route.why"]


def bytes_per_page() -> int:
    """SmolLM2-135M, 16-token pages: 30 layers x K,V x 16 x 3 heads x 64 x the bytes of the
    CPU's default dtype (bf16 where the CPU has native bf16, else fp32)."""
    import torch

    from pdmesh.config import engine_config_from_env
    from pdmesh.runtime.model_runner import resolve_dtype

    dtype = resolve_dtype(engine_config_from_env().dtype, "cpu")  # the workers' dtype
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return 30 * 2 * 16 * 3 * 64 * itemsize


def test_trace_show_renders_the_tree(traced_mesh):
    url, trace_file, _ = traced_mesh
    assert wait_until(lambda: request_trace(trace_file) is not None, 20)
    out = subprocess.run([sys.executable, "-m", "pdmesh.cli", "trace", "show", trace_file],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "3 services (pdmesh-decode, pdmesh-gateway, pdmesh-prefill)" in text
    # nesting is drawn: the deeper the span, the further right its name starts
    lines = text.splitlines()
    col = {name: next(l.index(name) for l in lines if name in l)
           for name in ("POST /v1/chat/completions", "chat default",
                        "/pdmesh.v1.Prefill/Transfer", "kv.transfer")}
    assert col["POST /v1/chat/completions"] < col["chat default"] < \
        col["/pdmesh.v1.Prefill/Transfer"] < col["kv.transfer"]
    assert "pdmesh.kv.bytes=" in text and " ms" in text


def test_trace_show_summary_says_where_the_time_goes(traced_mesh):
    url, trace_file, _ = traced_mesh
    assert wait_until(lambda: request_trace(trace_file) is not None, 20)
    out = subprocess.run([sys.executable, "-m", "pdmesh.cli", "trace", "show", trace_file,
                          "--summary", "--last", "50"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {}
    for line in out.stdout.splitlines()[2:]:
        name, service, n, *nums = line.rsplit(maxsplit=6)
        rows[(name.strip(), service)] = (int(n), *map(float, nums))
    # the whole request is the root: it starts at 0 and outlasts every span in it
    root = rows[("POST /v1/chat/completions", "pdmesh-gateway")]
    assert root[1] == 0.0
    transfer = rows[("kv.transfer", "pdmesh-prefill")]
    assert transfer[0] >= 1 and 0 < transfer[1] and 0 < transfer[3] <= root[3]
    assert rows[("prefill.compute", "pdmesh-prefill")][3] > 0


def scrape(url: str) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value of every sample at a /metrics URL."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_move_by_the_right_amounts(traced_mesh):
    url, _, lines = traced_mesh
    urls = metrics_urls(lines)
    assert set(urls) == {"registry", "prefill-0", "decode-1", "gateway"}
    client = openai.OpenAI(base_url=url, api_key="none")
    chat(client, max_tokens=2)  # first-use costs (channels, the pair's KV path) before counting
    before = {k: scrape(u) for k, u in urls.items()}
    n, out_len = 4, 8
    usages = [chat(client, max_tokens=out_len).usage for _ in range(n)]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    time.sleep(1.2)  # a heartbeat or two (0.5 s interval) reach the registry
    after = {k: scrape(u) for k, u in urls.items()}
    prompt = sum(u.prompt_tokens for u in usages)
    # pages sent: those after the decode's cached prefix (decode-side reuse; the same prompt
    # again, so cached_tokens is that prefix: all full pages but the last token's)
    pages = sum(math.ceil(u.prompt_tokens / 16) - u.prompt_tokens_details.cached_tokens // 16
                for u in usages)
    assert pages == n  # one page each

    g = lambda name, **kw: delta(before["gateway"], after["gateway"], name, **kw)  # noqa: E731
    assert g("pdmesh_gateway_requests_total", endpoint="ChatCompletions", status="OK") == n
    assert g("pdmesh_gateway_requests_total", endpoint="ChatCompletions", status="NOT_FOUND") == 1
    for h in ("time_to_first_token", "e2e_request_latency", "time_per_output_token"):
        assert g(f"pdmesh_gateway_{h}_seconds_count") == n, h
    assert n <= g("pdmesh_gateway_inter_token_latency_seconds_count") <= n * (out_len - 1)
    assert g("pdmesh_gateway_generation_tokens_total") == n * out_len
    assert g("pdmesh_gateway_prompt_tokens_total") == prompt
    assert after["gateway"][("pdmesh_gateway_requests_running", ())] == 0
    # the TTFT parts, measured in three processes, add up to the TTFT the gateway measured
    ttft = g("pdmesh_gateway_time_to_first_token_seconds_sum")
    parts = {p: g("pdmesh_gateway_ttft_part_seconds_sum", part=p)
             for p in ("queue", "prefill", "transfer", "first_decode")}
    assert all(g("pdmesh_gateway_ttft_part_seconds_count", part=p) == n for p in parts)
    # the parts are the workers' stages; the rest of TTFT is the gateway's own work and
    # the hops (tokenize, route, the decode's Transfer call, verify and adopt), ~25 ms
    # here: with repeated prompts served from the prefix cache that is ~20% of TTFT
    assert 0.7 * ttft <= sum(parts.values()) <= 1.02 * ttft, (parts, ttft)
    assert parts["prefill"] > parts["transfer"] > 0

    p = lambda name, **kw: delta(before["prefill-0"], after["prefill-0"], name, **kw)  # noqa: E731
    assert p("pdmesh_worker_rpcs_total", method="Prefill", code="OK") == n
    assert p("pdmesh_worker_rpcs_total", method="Transfer", code="OK") == n
    # both workers on this host: the prefill writes through shared memory (transfer.route)
    assert p("pdmesh_kv_transfer_pages_total", path="shm") == pages
    assert p("pdmesh_kv_transfer_bytes_total", path="shm") == pages * bytes_per_page()
    assert p("pdmesh_kv_transfer_seconds_count", path="shm") == n
    assert p("pdmesh_kv_transfer_failures_total", path="shm") == 0
    assert p("pdmesh_worker_prompt_tokens_total") == prompt
    assert p("pdmesh_worker_finished_requests_total") == n
    assert after["prefill-0"][("pdmesh_worker_kv_pages_used", ())] == 0
    # one request at a time, short prompts: one prefill step each and no decode step
    assert p("pdmesh_worker_prefill_steps_total") == n
    assert p("pdmesh_worker_decode_steps_total") == 0

    d = lambda name, **kw: delta(before["decode-1"], after["decode-1"], name, **kw)  # noqa: E731
    assert d("pdmesh_worker_rpcs_total", method="Generate", code="OK") == n
    assert d("pdmesh_worker_generation_tokens_total") == n * (out_len - 1)  # token 1: prefill's
    assert d("pdmesh_worker_finished_requests_total") == n
    assert d("pdmesh_decode_admission_wait_seconds_count") == n
    # a batch of one: a decode step per generated token, and no prefill on the decode
    assert d("pdmesh_worker_decode_steps_total") == n * (out_len - 1)
    assert d("pdmesh_worker_prefill_steps_total") == 0
    assert after["decode-1"][("pdmesh_worker_kv_pages_used", ())] == 0
    assert after["decode-1"][("pdmesh_worker_running_requests", ())] == 0

    r = lambda name, **kw: delta(before["registry"], after["registry"], name, **kw)  # noqa: E731
    assert r("pdmesh_registry_heartbeats_total") >= 2
    assert r("pdmesh_registry_rpcs_total", method="Heartbeat", code="OK") == \
        r("pdmesh_registry_heartbeats_total")
    assert after["registry"][("pdmesh_registry_workers_prefill", ())] == 1
    assert after["registry"][("pdmesh_registry_workers_decode", ())] == 1
    assert r("pdmesh_registry_expiries_total") == 0


def test_workers_log_periodic_summaries(traced_mesh):
    """Each worker logs one SGLang-style line per interval while it has work."""
    url, _, lines = traced_mesh
    chat(openai.OpenAI(base_url=url, api_key="none"), max_tokens=24)

    def summary(kind: str, rate: str):
        for line in list(lines):
            m = re.search(kind + r" batch\. .*" + re.escape(rate) + r" \(token/s\): ([\d.]+)", line)
            if m and float(m.group(1)) > 0:
                return line
    assert wait_until(lambda: summary("Decode", "gen throughput"), 10), "".join(lines[-30:])
    assert wait_until(lambda: summary("Prefill", "input throughput"), 10), "".join(lines[-30:])
    line = summary("Decode", "gen throughput")
    for field in ("#running-req:", "#token:", "token usage:", "#queue-req:"):
        assert field in line


def test_grpc_entry_span_roots_the_trace(traced_mesh):
    """Through the gateway's gRPC API the aio server interceptor opens the trace."""
    from pdmesh.client import Client

    url, trace_file, lines = traced_mesh
    grpc_addr = re.search(r"gateway listening on \S+ \(REST\) and (\S+) \(gRPC\)",
                          "".join(lines)).group(1)
    text = "".join(Client(grpc_addr).chat([{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0))
    assert text

    def trace():
        spans = read_spans(trace_file)
        roots = [s for s in spans if s.name == "/pdmesh.v1.Gateway/Chat"]
        mine = [s for s in spans if roots and s.trace_id == roots[0].trace_id]
        return mine if {"kv.transfer", "completion", "chat default"} <= {s.name for s in mine} \
            else None
    assert wait_until(trace, 20)
    mine = trace()
    by_name = {(s.name, s.service): s for s in mine}
    root = by_name[("/pdmesh.v1.Gateway/Chat", "pdmesh-gateway")]
    assert root.parent_id == "" and root.kind == "SPAN_KIND_SERVER"
    assert by_name[("chat default", "pdmesh-gateway")].parent_id == root.span_id
    assert {s.service for s in mine} == SERVICES
