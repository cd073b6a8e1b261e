"""pdmesh.bench metric definitions, report formats and workloads (unit tests, no server)."""
from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

from pdmesh.bench.metrics import Dist, RequestRecord, meets_slo, run_duration, summarize
from pdmesh.bench.report import HEADERS, format_table, from_json, load_results, to_json
from pdmesh.bench.workload import Workload, WorkloadSpec




def rec(ttft, e2e, out, itl=(), start=0.0, prompt=10, ok=True, error=""):
    return RequestRecord(ok, error, prompt, out, ttft, e2e, list(itl), start)


def test_dist_uses_linear_interpolated_percentiles():
    d = Dist.of([1.0, 2.0, 3.0, 4.0])
    assert (d.mean, d.median) == (2.5, 2.5)
    assert d.p90 == pytest.approx(3.7)  # 1 + 0.9 * 3 on ranks 0..3, numpy "linear"
    assert d.p99 == pytest.approx(3.97)
    assert Dist.of([]) == Dist(0.0, 0.0, 0.0, 0.0)  # bench_serving's `x or 0`


def test_tpot_ttft_itl_of_one_request_from_chunk_times():
    # sent at t=10; content chunks at 10.5, 10.7, 11.0, 11.6; [DONE] at 11.65
    chunks = [10.5, 10.7, 11.0, 11.6]
    r = rec(ttft=chunks[0] - 10, e2e=11.65 - 10, out=4, itl=np.diff(chunks).tolist(), start=10)
    s = summarize([r], duration=1.65)
    assert s.ttft.mean == pytest.approx(0.5)
    assert s.tpot.mean == pytest.approx((1.65 - 0.5) / 3)  # (e2e - TTFT) / (out - 1)
    assert s.itl.mean == pytest.approx(1.1 / 3) and s.itl.p99 == pytest.approx(0.6 - 0.006)
    assert r.end == pytest.approx(11.65)


def test_summarize_hand_computed_run():
    a = rec(0.5, 2.5, 5, itl=[0.5, 0.5, 0.5, 0.5], start=0.0, prompt=100)
    b = rec(1.0, 1.0, 1, start=1.0, prompt=50)  # one token: no TPOT, no ITL
    c = rec(0, 0, 0, start=0.5, ok=False, error="HTTP 500: boom")
    s = summarize([a, b, c], duration=4.0, label="x", concurrency=2, slo_ttft=0.6)
    assert (s.number, s.completed, s.failed) == (3, 2, 1)
    assert s.req_s == pytest.approx(0.5) and s.output_tok_s == pytest.approx(6 / 4)
    assert s.input_tok_s == pytest.approx(150 / 4) and s.total_tok_s == pytest.approx(156 / 4)
    assert s.ttft == Dist(0.75, 0.75, pytest.approx(0.95), pytest.approx(0.995))
    assert s.tpot.mean == pytest.approx(0.5) and s.itl.mean == pytest.approx(0.5)
    assert s.e2e.mean == pytest.approx(1.75)
    assert s.goodput_req_s == pytest.approx(1 / 4) and s.slo_attainment == pytest.approx(1 / 3)
    assert s.errors == ("HTTP 500: boom",)
    assert s.avg_concurrency == pytest.approx(3.5 / 4)
    assert summarize([a, b]).duration_s == pytest.approx(run_duration([a, b])) == 2.5
    assert summarize([a, b]).goodput_req_s is None  # no SLO given


def test_slo_checks_tpot_and_failures():
    assert meets_slo(rec(0.5, 2.5, 5), None, 0.5) and not meets_slo(rec(0.5, 2.5, 5), None, 0.49)
    assert meets_slo(rec(0.5, 0.5, 1), 1.0, 0.001)  # a 1-token request has TPOT 0
    assert not meets_slo(rec(0.1, 0.2, 2, ok=False), None, None)


def test_matches_sglang_calculate_metrics():
    """Same records through bench_serving 0.5.2's own calculate_metrics give the same numbers."""
    bs = importlib.import_module("sglang.bench_serving")  # scripts/install.sh installs it
    rng = np.random.default_rng(0)
    recs, outs = [], []
    for i in range(37):
        n = int(rng.integers(1, 20))
        itl = rng.uniform(0.01, 0.2, n - 1).tolist()
        ttft = float(rng.uniform(0.05, 2))
        e2e = ttft + sum(itl) + float(rng.uniform(0, 0.01))
        ok = i % 9 != 4
        recs.append(rec(ttft, e2e, n, itl, start=i * 0.1, prompt=int(rng.integers(5, 50)), ok=ok))
        o = bs.RequestFuncOutput(success=ok, latency=e2e, ttft=ttft, itl=itl,
                                 prompt_len=recs[-1].prompt_tokens, output_len=n,
                                 generated_text="x")
        outs.append(o)

    class Tok:  # calculate_metrics retokenizes generated text; irrelevant here
        def encode(self, text, add_special_tokens=False):
            return [0]

    m, _ = bs.calculate_metrics([], outs, 7.5, Tok(), "sglang-oai")
    s = summarize(recs, duration=7.5)
    assert s.completed == m.completed and s.req_s == pytest.approx(m.request_throughput)
    assert s.output_tok_s == pytest.approx(m.output_throughput)
    assert s.input_tok_s == pytest.approx(m.input_throughput)
    for ours, name in ((s.ttft, "ttft"), (s.tpot, "tpot"), (s.itl, "itl"), (s.e2e, "e2e_latency")):
        assert ours.mean * 1000 == pytest.approx(getattr(m, f"mean_{name}_ms"))
        assert ours.median * 1000 == pytest.approx(getattr(m, f"median_{name}_ms"))
        assert ours.p99 * 1000 == pytest.approx(getattr(m, f"p99_{name}_ms"))
    assert s.avg_concurrency == pytest.approx(m.concurrency)


def test_table_and_json_round_trip():
    runs = [summarize([rec(0.5, 2.5, 5, start=0)], 2.5, label="1P1D", concurrency=c)
            for c in (2, 8)]
    rate = summarize([rec(0.5, 2.5, 5)], 2.5, label="1P1D", request_rate=1.5)
    table = format_table(runs + [rate])
    lines = table.splitlines()
    assert all(h in lines[0] for h in HEADERS) and lines[0].split()[0] == "label"
    assert len(lines) == 5 and "rate=1.5" in lines[4]
    cells = lines[2].split()
    assert cells[:3] == ["1P1D", "2", "2.0"] and cells[-1] == "0"
    md = format_table(runs, markdown=True).splitlines()
    assert md[0].startswith("| label | concurrency | output tok/s") and md[1].startswith("|---|")
    text = to_json(runs + [rate], {"input_len": [8, 8]})
    assert from_json(text) == runs + [rate]
    back, cfg = load_results(text)
    assert cfg == {"input_len": [8, 8]} and back[2].request_rate == 1.5
    old = json.loads(text)["runs"]
    for d in old:
        d.pop("avg_concurrency"), d.pop("errors")  # files from before additive fields
    assert from_json(json.dumps(old))[0].avg_concurrency == 0.0
    with pytest.raises(ValueError, match="results file"):
        from_json('{"a": 1}')


@pytest.fixture(scope="module")
def tokenizer():
    from tiny_models import smollm2_tokenizer
    return smollm2_tokenizer()


def test_workload_is_seeded_and_in_range(tokenizer):
    w = Workload(WorkloadSpec((20, 30), (4, 9), prompt_ids="uniform", seed=3), tokenizer)
    a, b = w.sample(12), w.sample(12)
    assert a == b and a != w.sample(12, seed=4)
    assert all(4 <= r.output_tokens <= 9 for r in a)
    assert len({r.output_tokens for r in a}) > 1
    assert all(10 <= r.prompt_tokens <= 60 for r in a)  # re-encoded decoded random ids
    with pytest.raises(ValueError, match="input_len"):
        WorkloadSpec((5, 4), (1, 1))


def test_sequential_prompts_equal_bench_serving_random_ids(tokenizer):
    bs = importlib.import_module("sglang.bench_serving")  # scripts/install.sh installs it
    np.random.seed(5)  # bench_serving seeds numpy's global RNG with --seed
    theirs = bs.sample_random_requests(40, 6, 5, 1.0, tokenizer, "", random_sample=False)
    ours = Workload(WorkloadSpec((40, 40), (6, 6), seed=5), tokenizer).sample(5)
    assert [r.prompt for r in ours] == [r.prompt for r in theirs]
    assert [r.output_tokens for r in ours] == [r.output_len for r in theirs] == [6] * 5
