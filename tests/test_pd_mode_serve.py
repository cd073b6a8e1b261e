"""Per-request disaggregation end to end: one `pdmesh serve --prefill 1 --decode 1
--pd-mode never` (real processes, the default model, the `openai` client) plus two more
gateways on its registry, `--pd-mode auto` (traced) and `--pd-mode always`, so the three
policies share the same two workers.

auto prefills a short prompt on the decode worker itself (no KV moves: the prefill
worker's transfer counters stay put) with the same greedy text as the disaggregated
path, and sends a long prompt to the prefill worker; `never` prefills everything locally,
`always` everything remotely; the route span says which (pdmesh.route.pd_mode) with the
predicted TTFT; afterwards every page is free again on both workers."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh_procs import (SERVE_TOKEN, chat_when_routable, metrics_urls, start_serve,
                        terminate, wait_until, worker_addresses, worker_env)
from pdmesh import auth
from pdmesh.telemetry.otlp_file import read_spans
from pdmesh.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

SHORT = "Name one colour of the rainbow."
# ~830 prompt tokens: a local prefill would stall the decode ~1 s (> the 0.25 s bound)
LONG = " ".join(["The quick brown fox jumps over the lazy dog."] * 80) + " Which animal jumps?"
MAX_TOKENS = 10


def start_gateway(registry: str, *args: str, env: dict[str, str] | None = None):
    """Start `pdmesh gateway` on `registry` with free ports (wait for it: `listening`)."""
    return subprocess.Popen([sys.executable, "-m", "pdmesh.cli", "gateway", "--registry",
                             registry, "--port", "0", "--grpc-port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or worker_env(PDMESH_CLUSTER_TOKEN=SERVE_TOKEN))


def listening(proc) -> str:
    """The gateway's REST base URL once it says it listens (its output drained after)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if m := re.search(r"listening on (\S+) \(REST\)", line):
            threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
            return f"http://{m.group(1)}/v1"
    raise AssertionError("pdmesh gateway exited:\n" + "".join(lines))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    trace_file = str(tmp_path_factory.mktemp("pd_mode") / "spans.jsonl")
    proc, base, lines = start_serve("--pd-mode", "never")
    registry = re.search(r"registry (\S+?),", "".join(lines)).group(1)
    env = worker_env(PDMESH_CLUSTER_TOKEN=SERVE_TOKEN, OTEL_BSP_SCHEDULE_DELAY="100")
    bases, gateways = {"never": base}, {}
    try:
        # both start at once (each loads the tokenizer: seconds)
        gateways["auto"] = start_gateway(registry, "--pd-mode", "auto", "--trace-file",
                                         trace_file, env=env)
        gateways["always"] = start_gateway(registry, "--pd-mode", "always")
        bases.update({name: listening(g) for name, g in gateways.items()})
        yield {"base": bases, "lines": lines, "trace_file": trace_file}
    finally:
        for g in gateways.values():
            terminate(g, 30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines)


def chat(base: str, prompt: str):
    client = openai.OpenAI(base_url=base, api_key="unused")
    return chat_when_routable(client, model="default", max_tokens=MAX_TOKENS, temperature=0,
                              messages=[{"role": "user", "content": prompt}])


def samples(url: str, name: str) -> dict[tuple, float]:
    """label values -> value of every sample called `name` at a /metrics URL."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {tuple(sorted(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == name}


def choices(base: str) -> dict[str, float]:
    """pd_mode -> requests routed so by the gateway at `base`."""
    got = samples(base.removesuffix("/v1") + "/metrics", "pdmesh_gateway_pd_mode_requests_total")
    return {dict(k)["pd_mode"]: v for k, v in got.items()}


def kv_bytes_written(mesh) -> float:
    """KV bytes the prefill worker wrote into the decode worker, over every path."""
    url = metrics_urls(mesh["lines"])["prefill-0"]
    return sum(samples(url, "pdmesh_kv_transfer_bytes_total").values())


def test_auto_short_local_long_remote_same_text(mesh):
    base = mesh["base"]
    remote_text = chat(base["always"], SHORT).choices[0].message.content
    written = kv_bytes_written(mesh)
    before = choices(base["auto"])
    local = chat(base["auto"], SHORT)
    after = choices(base["auto"])
    assert after.get("local", 0) == before.get("local", 0) + 1, after
    assert kv_bytes_written(mesh) == written  # prefilled on the decode: nothing moved
    # greedy: the decode's own prefill gives the disaggregated path's text
    assert local.choices[0].message.content == remote_text
    assert local.usage.completion_tokens == MAX_TOKENS
    long = chat(base["auto"], LONG)
    assert long.usage.prompt_tokens > 700
    final = choices(base["auto"])
    assert final.get("remote", 0) == after.get("remote", 0) + 1, final
    assert kv_bytes_written(mesh) > written  # its KV went prefill -> decode


def test_route_span_says_pd_mode_and_predicted_ttft(mesh):
    chat(mesh["base"]["auto"], SHORT + " Just one.")

    def routes():
        spans = [s for s in read_spans(mesh["trace_file"]) if s.name == "route"]
        return spans if any(s.attributes.get("pdmesh.route.pd_mode") == "local"
                            for s in spans) else None
    assert wait_until(routes, 20)
    local = next(s for s in routes() if s.attributes["pdmesh.route.pd_mode"] == "local")
    attrs = local.attributes
    assert attrs["pdmesh.route.mode"] == "local" and "pdmesh.route.prefill" not in attrs
    assert attrs["pdmesh.route.pd_mode.policy"] == "auto"
    assert 0 < attrs["pdmesh.route.pd_mode.predicted_ttft_s"] \
        == attrs["pdmesh.route.pd_mode.predicted_ttft_local_s"] \
        < attrs["pdmesh.route.pd_mode.predicted_ttft_remote_s"]


@pytest.mark.parametrize("policy,mode", [("never", "local"), ("always", "remote")])
def test_fixed_policies_route_every_request_their_way(mesh, policy, mode):
    base = mesh["base"][policy]
    before, written = choices(base), kv_bytes_written(mesh)
    texts = [chat(base, p).choices[0].message.content for p in (SHORT, LONG)]
    after = choices(base)
    assert after.get(mode, 0) == before.get(mode, 0) + 2, after
    other = "remote" if mode == "local" else "local"
    assert after.get(other, 0) == before.get(other, 0)
    assert (kv_bytes_written(mesh) > written) == (mode == "remote")
    assert all(texts)
    # gateway TTFT histograms: predicted and measured, one of each per request
    hist = samples(base.removesuffix("/v1") + "/metrics",
                   "pdmesh_gateway_pd_mode_ttft_seconds_count")
    assert hist[(("pd_mode", mode), ("source", "measured"))] \
        == hist[(("pd_mode", mode), ("source", "predicted"))] >= 2


def test_pages_back_to_total_afterwards(mesh):
    chat(mesh["base"]["never"], LONG)  # a long local prefill too
    (paddr,), (daddr,) = (worker_addresses(mesh["lines"], r) for r in ("prefill", "decode"))
    with auth.insecure_channel(daddr, token=SERVE_TOKEN) as dch, \
            auth.insecure_channel(paddr, token=SERVE_TOKEN) as pch:
        d = decode_pb2_grpc.DecodeStub(dch)
        p = prefill_pb2_grpc.PrefillStub(pch)

        def idle():
            ds = d.Stats(decode_pb2.StatsRequest(), timeout=5)
            ps = p.Stats(prefill_pb2.PrefillStatsRequest(), timeout=5)
            return (ds.free_pages == ds.total_pages and ds.quarantined_pages == 0
                    and ds.used_pages == 0 and ps.free_pages == ps.total_pages)
        assert wait_until(idle, 20)
