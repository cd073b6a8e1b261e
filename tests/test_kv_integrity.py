"""KV integrity end to end: `pdmesh serve` 1P1D with the chaos hook corrupting KV writes
(PDMESH_CHAOS_CORRUPT_KV). With checksums on, a corrupted first write is caught by the
prefill's read-back and rewritten: greedy output equals the runtime alone, the retry
counter moves. With the default (decode's check only) the corrupted request fails
(DATA_LOSS), counted; a rewrite that stays corrupted is unit-tested
(tests/test_disagg_integrity.py). With checksums off the same corruption changes the
output: the injection is real."""
from __future__ import annotations

import signal
import time

import pytest

from mesh_procs import chat_when_routable, metric, metrics_urls, start_serve
from pdmesh import Engine, SamplingParams

QUESTION = "What is the capital of France?"
KW = dict(model="default", messages=[{"role": "user", "content": QUESTION}], max_tokens=12,
          temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def expected(default_model) -> str:
    return Engine(loaded=default_model, num_pages=64).generate(
        messages=[{"role": "user", "content": QUESTION}],
        params=SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].text


def serve(monkeypatch, **env: str):
    """serve 1P1D with `env` (the workers inherit it); (process, openai client, lines)."""
    import openai

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    proc, base, lines = start_serve("--worker-arg=--kv-cache-bytes=50000000")
    return proc, openai.OpenAI(base_url=base, api_key="unused", max_retries=0), lines


def stop(proc, lines) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, "".join(lines)


def integrity(lines) -> dict[str, float]:
    urls = metrics_urls(lines)
    pre = next(u for n, u in urls.items() if n.startswith("prefill"))
    dec = next(u for n, u in urls.items() if n.startswith("decode"))
    return {"retries": metric(pre, "pdmesh_kv_integrity_retries_total"),
            "prefill": metric(pre, "pdmesh_kv_integrity_failures_total", stage="prefill"),
            "decode": metric(dec, "pdmesh_kv_integrity_failures_total", stage="decode")}


def test_corrupted_first_writes_are_rewritten(monkeypatch, expected):
    proc, client, lines = serve(monkeypatch, PDMESH_CHAOS_CORRUPT_KV="1.0",
                                PDMESH_KV_CHECKSUM="on")
    try:
        for _ in range(3):
            assert chat_when_routable(client, **KW).choices[0].message.content == expected
        assert integrity(lines) == {"retries": 3, "prefill": 0, "decode": 0}
    finally:
        stop(proc, lines)
    assert any("chaos: corrupted KV page" in line for line in lines)


def failed_request(client) -> str:
    """The error message of a request the mesh fails (after the gateway knows workers)."""
    import openai

    for _ in range(100):
        try:
            client.chat.completions.create(**KW)
        except openai.APIStatusError as e:
            if "no worker could complete" in str(e):
                return str(e)
        time.sleep(0.2)
    raise AssertionError("no request failed")


def test_default_decode_check_fails_corrupted_requests(monkeypatch):
    """The default (--kv-checksum decode): no read-back on the prefill, so the decode
    finds the mismatch before adopting; the request fails (the gateway's retry, a new
    room, is corrupted too), counted on the decode, never decoded from."""
    proc, client, lines = serve(monkeypatch, PDMESH_CHAOS_CORRUPT_KV="1.0")
    try:
        failed_request(client)  # the client sees a generic 503 (the gateway logs why)
        counts = integrity(lines)
        assert counts["decode"] >= 1 and counts["retries"] == counts["prefill"] == 0, counts
    finally:
        stop(proc, lines)
    # with the CPU writers' default algorithm, xxh3 (pdmesh/transfer/checksum.py)
    assert any("DATA_LOSS" in line and "not adopted" in line and "xxh3:" in line
               for line in lines), "".join(lines[-30:])


def test_checksum_off_lets_corruption_change_the_output(monkeypatch, expected):
    proc, client, lines = serve(monkeypatch, PDMESH_CHAOS_CORRUPT_KV="1.0",
                                PDMESH_KV_CHECKSUM="off")
    try:
        assert chat_when_routable(client, **KW).choices[0].message.content != expected
        assert integrity(lines) == {"retries": 0, "prefill": 0, "decode": 0}
    finally:
        stop(proc, lines)
