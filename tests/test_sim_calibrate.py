"""Calibration (pdmesh/sim/calibrate.py) and the `pdmesh simulate` command line."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from pdmesh.bench.report import load_results
from pdmesh.cli import main
from pdmesh.sim.calibrate import fit_table, loads_of, nelder_mead, parse_table, simulate_rows
from pdmesh.sim.profile import Profile
from pdmesh.sim.simulator import Deployment, FixedLoad, Workload

# a copy of ../shared/reference/deepseek-v3-1p1d-b200.md, so a clean clone has it
REFERENCE = Path(__file__).resolve().parents[1] / "benchmarks/reference/deepseek-v3-1p1d-b200.md"
TRUE = Profile(prefill_a=0.05, prefill_b=4e-4, decode_a=0.03, decode_b=1.5e-3, decode_c=0.0,
               max_prefill_tokens=2048, chunked_prefill_size=2048, transfer_latency=0.002)
WL = Workload(200, 400, 20, 40, seed=2)
CONCS = [1, 4, 8, 16]


def _md(rows) -> str:
    lines = ["| concurrency | output tok/s | avg TTFT s | P99 TTFT s | avg TPOT s | "
             "avg latency s | req/s | failed |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.concurrency} | {r.output_tps:.3f} | {r.ttft:.5f} | {r.ttft_p99:.5f} | "
              f"{r.tpot:.6f} | {r.latency:.4f} | {r.req_s:.4f} | 0 |" for r in rows]
    return "\n".join(lines) + "\n"


def test_nelder_mead_finds_a_quadratic_minimum():
    x, fx = nelder_mead(lambda v: float(((v - [1.0, -2.0]) ** 2).sum()), np.zeros(2), iters=400)
    assert x == pytest.approx([1.0, -2.0], abs=1e-3) and fx < 1e-6


def test_fit_recovers_known_parameters_from_a_synthetic_table(tmp_path):
    rows = simulate_rows(TRUE, WL, Deployment(1, 1), [FixedLoad(c, 4 * c) for c in CONCS])
    path = tmp_path / "t.md"
    path.write_text("A synthetic table\n\n" + _md(rows))
    parsed = parse_table(path)
    assert [r.concurrency for r in parsed] == CONCS
    start = TRUE.replace(prefill_a=0.01, prefill_b=1e-4, decode_a=0.01, decode_b=1e-4)
    fit = fit_table(parsed, start, WL, Deployment(1, 1), per_client=4,
                    params=("prefill_a", "prefill_b", "decode_a", "decode_b"), iters=400)
    assert fit.error < 1e-3
    for name in ("prefill_a", "prefill_b", "decode_a", "decode_b"):
        assert getattr(fit.profile, name) == pytest.approx(getattr(TRUE, name), rel=0.15), name


def test_reference_table_parses():
    rows = parse_table(REFERENCE)
    assert [r.concurrency for r in rows] == [4, 8, 16, 32, 64, 96, 128, 192, 256]
    assert (rows[0].output_tps, rows[0].ttft, rows[-1].ttft_p99, rows[-1].tpot) == \
        (39.3, 0.62, 68.40, 0.108)
    assert loads_of(rows, 4)[-1] == FixedLoad(256, 1024)


def test_simulate_cli_profile_sweep_prints_tables_and_json(tmp_path, capsys):
    prof = tmp_path / "p.json"
    TRUE.save(prof)
    out = tmp_path / "sim.json"
    assert main(["simulate", "--profile", str(prof), "--input-len", "200", "400",
                 "--output-len", "30", "--deployments", "1P1D", "2P1D", "1P2D",
                 "--parallel", "1", "8", "--number", "4", "32", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("Simulated") == 3 and "output tok/s" in text and "P99 TTFT s" in text
    runs, config = load_results(out.read_text())
    assert [(s.label, s.concurrency, s.number, s.failed) for s in runs] == [
        (d, c, n, 0) for d in ("1P1D", "2P1D", "1P2D") for c, n in ((1, 4), (8, 32))]
    assert config["simulated"] and config["profile"]["prefill_b"] == TRUE.prefill_b
    one, two = runs[1], runs[3]  # concurrency 8: two prefill workers cut TTFT
    assert two.ttft.mean < one.ttft.mean


def test_simulate_cli_calibrates_from_a_table(tmp_path, capsys):
    rows = simulate_rows(TRUE, WL, Deployment(1, 1), [FixedLoad(c, 4 * c) for c in CONCS])
    table = tmp_path / "measured.md"
    table.write_text(_md(rows))
    saved = tmp_path / "fitted.json"
    assert main(["simulate", "--calibrate-from-table", str(table), "--input-len", "200", "400",
                 "--output-len", "20", "40", "--seed", "2", "--max-prefill-tokens", "2048",
                 "--chunked-prefill-size", "2048", "--transfer-latency", "0.002",
                 "--fit-iters", "60", "--deployments", "1P1D", "2P1D", "--markdown",
                 "--save-profile", str(saved)]) == 0
    text = capsys.readouterr().out
    assert "Fit of 1P1D" in text and "meas / sim" in text
    assert "| 2P1D | 16 |" in text and "| 1P1D | 16 |" in text  # table's concurrencies
    assert json.loads(saved.read_text())["profile"]["max_prefill_tokens"] == 2048


@pytest.mark.parametrize("args, message", [
    ([], "exactly one of --profile"),
    (["--profile", "/nonexistent.json"], "cannot read profile"),
    (["--calibrate-from-table", "{table}", "--deployments", "2X"], "deployment must look like"),
    (["--calibrate-from-table", "{table}", "--parallel", "1", "2", "--number", "1", "2", "3"],
     "--number takes one value"),
    (["--calibrate-from-table", "{empty}"], "no markdown table"),
])
def test_simulate_cli_bad_input_exits_2(tmp_path, capsys, args, message):
    (tmp_path / "t.md").write_text(_md(simulate_rows(TRUE, WL, Deployment(1, 1),
                                                     [FixedLoad(1, 2)])))
    (tmp_path / "e.md").write_text("no table here\n")
    args = [a.format(table=tmp_path / "t.md", empty=tmp_path / "e.md") for a in args]
    assert main(["simulate", *args]) == 2
    assert message in capsys.readouterr().err


def test_simulate_compare_reproduces_its_own_runs_exactly(tmp_path, capsys):
    """--compare reads bench JSON labelled by deployment and simulates the same loads: a
    file the simulator wrote itself (same profile, workload, seed) matches to 0%."""
    from pdmesh.bench.report import to_json
    from pdmesh.sim.report import simulate_run

    prof = tmp_path / "p.json"
    TRUE.save(prof)
    wl = Workload(200, 400, 30, 30, seed=0)
    runs = [simulate_run(TRUE, Deployment(2, 1), wl, FixedLoad(c, 4 * c), label="2P1D")
            for c in (2, 6)]
    (tmp_path / "m.json").write_text(to_json(runs))
    assert main(["simulate", "--profile", str(prof), "--input-len", "200", "400",
                 "--output-len", "30", "--compare", str(tmp_path / "m.json")]) == 0
    text = capsys.readouterr().out
    assert "2P1D: measured" in text and text.count("(+0%)") + text.count("(-0%)") == 12
    (tmp_path / "u.json").write_text(to_json([dataclasses.replace(runs[0], label="x")]))
    assert main(["simulate", "--profile", str(prof), "--compare", str(tmp_path / "u.json")]) == 2
    assert "label the bench runs with their deployment" in capsys.readouterr().err
