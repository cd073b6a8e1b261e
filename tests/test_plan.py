"""`pdmesh plan`: the ratio arithmetic, the profile fit, and the command against a real mesh."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest

from mesh_procs import SERVE_TOKEN, chat_when_routable, start_serve, worker_env
from pdmesh.bench.metrics import RequestRecord
from pdmesh.plan.fit import fit_decode
from pdmesh.plan.measure import step_time_after
from pdmesh.plan.ratio import (DecodePoint, PrefillPoint, decode_capacity, prefill_capacity,
                               recommend)
from pdmesh.sim.profile import Profile


def test_design_example_2p1d():
    # DESIGN.md: P serves 5 req/s, D serves 10 req/s at the SLO -> 2P1D (for 10 req/s)
    dec = DecodePoint(batch=50, step_s=0.05, output_len=101)  # 50 / (100 * 0.05) = 10 req/s
    assert dec.req_s == pytest.approx(10.0) and dec.gen_tok_s == pytest.approx(1000.0)
    rec = recommend(10.0, 5.0, dec, input_len=1000, output_len=101, kv_tokens=10**6,
                    max_running=256)
    assert (rec.prefill, rec.decode, rec.name) == (2, 1, "2P1D")
    assert "P = ceil(10 / 5.000) = 2" in rec.lines[0]
    assert "D = ceil(10 / 10.000) = 1" in rec.lines[1]
    assert "fits" in rec.lines[2] and rec.lines[-1] == "recommendation: 2P1D for 10 req/s"


def test_kv_check_adds_decode_workers_until_the_batch_fits():
    # 10 req/s x 100 steps x 0.05 s = 50 requests per decode at D=1; 50 x 1101 tokens > 30000
    dec = DecodePoint(batch=50, step_s=0.05, output_len=101)
    rec = recommend(10.0, 20.0, dec, input_len=1000, output_len=101, kv_tokens=30000,
                    max_running=256)
    # D=1: 50 x 1101 = 55050 > 30000; D=2: 25 x 1101 = 27525 fits
    assert (rec.prefill, rec.decode) == (1, 2)
    assert "add a decode worker" in rec.lines[2] and "27525 tokens <= 30000" in rec.lines[3]
    with pytest.raises(ValueError):
        recommend(0.0, 1.0, dec, 1, 1, 1, 1)


def test_capacities_pick_the_highest_rate_meeting_the_slo():
    pts = [PrefillPoint(1, 1.0, 0.5), PrefillPoint(4, 2.5, 1.5), PrefillPoint(8, 2.7, 3.5)]
    assert prefill_capacity(pts, 2.0).concurrency == 4
    assert prefill_capacity(pts, 0.1) is None
    dpts = [DecodePoint(4, 0.04, 33), DecodePoint(16, 0.06, 33), DecodePoint(64, 0.2, 33)]
    assert decode_capacity(dpts, 0.1).batch == 16
    assert decode_capacity(dpts, 1.0).batch == 64


def test_fit_decode_recovers_a_line():
    pts = [DecodePoint(b, 0.03 + 0.002 * b, 64) for b in (2, 4, 8, 16)]
    a, b = fit_decode(pts)
    assert (a, b) == (pytest.approx(0.03), pytest.approx(0.002))
    assert fit_decode([DecodePoint(4, 0.05, 64)]) == (pytest.approx(0.05), 0.0)


def test_step_time_after_release():
    # slow steps (1 s) until t=10, then 0.05 s steps: 20 tokens after 10 s
    chunks = [1.0 + i for i in range(10)] + [10.0 + 0.05 * (i + 1) for i in range(20)]
    rec = RequestRecord(True, "", 10, 30, chunks[0], chunks[-1],
                        [b - a for a, b in zip(chunks, chunks[1:])], start=0.0)
    assert step_time_after([rec], 10.0) == pytest.approx(0.05)


def test_plan_against_a_real_mesh(tmp_path):
    """A short plan on a 1P1D `pdmesh serve`: writes a profile and prints a recommendation."""
    import openai

    proc, base, lines = start_serve("--worker-arg=--kv-cache-bytes=50000000")
    try:
        chat_when_routable(openai.OpenAI(base_url=base, api_key="unused"), model="default",
                           messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        ready = next(line for line in lines if "pdmesh serve: ready" in line)
        registry = re.search(r"registry ([^\s,]+)", ready).group(1)
        out = tmp_path / "profile.json"
        res = subprocess.run(
            [sys.executable, "-m", "pdmesh.cli", "plan", "--base-url", base, "--registry",
             registry, "--input-len", "24", "40", "--output-len", "8", "--slo-ttft", "30",
             "--slo-tpot", "5", "--target-rate", "3", "--prefill-concurrency", "1", "2",
             "--prefill-number-per-client", "1", "--decode-batch", "2", "3",
             "--decode-output-len", "24", "--decode-sleep", "0.3", "--fit-iters", "15",
             "--contention-probe", "2", "--cpu-cores", "2", "--output", str(out)],
            text=True, capture_output=True, env=worker_env(PDMESH_CLUSTER_TOKEN=SERVE_TOKEN),
            timeout=600)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines)
    assert res.returncode == 0, res.stdout + res.stderr
    rec = re.search(r"RECOMMENDATION: (\d+)P(\d+)D", res.stdout)
    assert rec and int(rec.group(1)) >= 1 and int(rec.group(2)) >= 1, res.stdout
    assert "P = ceil(3 / " in res.stdout and "KV check" in res.stdout
    data = json.loads(out.read_text())
    prof = Profile.from_dict(data["profile"])
    assert prof.decode_a > 0 and prof.prefill_b > 0 and 0.5 <= prof.cpu_cores <= 2
    assert prof.kv_capacity_tokens > 0 and prof.kv_bytes_per_token == 46080.0  # SmolLM2 fp32
    m = data["measurements"]
    assert [r["concurrency"] for r in m["prefill_runs"]] == [1, 2]
    assert all(r["failed"] == 0 and r["total_output_tokens"] == r["number"]
               for r in m["prefill_runs"])  # output length 1
    assert [p["batch"] for p in m["decode_points"]] == [2, 3]  # the batch did fill
    assert all(p["step_s"] > 0 for p in m["decode_points"])
    assert m["recommendation"] == f"{rec.group(1)}P{rec.group(2)}D"


def test_plan_bad_input_exits_2(capsys):
    from pdmesh.cli import main
    args = ["plan", "--registry", "127.0.0.1:1", "--slo-ttft", "1", "--slo-tpot", "1"]
    assert main(args + ["--target-rate", "0"]) == 2
    assert "--target-rate must be > 0" in capsys.readouterr().err
    assert main(args + ["--target-rate", "1", "--input-len", "9", "3"]) == 2
    assert "MIN MAX" in capsys.readouterr().err
