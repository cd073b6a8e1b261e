"""benchmarks/serve_gpu.py end to end on the CPU (its GPU recipe's code paths, small): the
engine alone and 1P1D (colocated runs the same served-mode code), two rounds, the rounds'
summary, each level's forward steps, --report-from. ~150 s of a loaded CI run with all
three modes and two levels; this is about half."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "serve_gpu.py"


def test_serve_gpu_runs_every_mode_over_rounds_on_the_cpu(tmp_path):
    out = tmp_path / "sg"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--concurrency", "2",
         "--output-len", "3", "--min-requests", "2", "--warmup", "1", "--no-profile",
         "--modes", "engine", "1p1d", "--rounds", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert len(data["rounds"]) == 2 and data["results"] == data["rounds"][0]
    engines = {"engine": {"engine"}, "1p1d": {"prefill-0", "decode-1"}}
    for res in data["rounds"]:
        assert set(res) == set(engines)
        for mode, r in res.items():
            assert [lv["concurrency"] for lv in r["levels"]] == [2]
            for lv in r["levels"]:
                assert lv["failed"] == 0 and lv["completed"] == lv["number"]
                assert set(lv["steps"]) == engines[mode], (mode, lv["steps"])
                # every level ran prompts and decoded them somewhere
                assert sum(s["prefill"] for s in lv["steps"].values()) >= lv["completed"] / 2
                assert sum(s["decode"] for s in lv["steps"].values()) >= 2
            if mode == "1p1d":  # a prefill worker never decodes, a decode never prefills
                assert all(lv["steps"]["prefill-0"]["decode"] == 0 and
                           lv["steps"]["decode-1"]["prefill"] == 0 for lv in r["levels"])
    report = (out / "report.md").read_text()
    assert "## Over 2 rounds" in report and "## Forward steps per level" in report
    assert "| 2 | median " in report
    again = subprocess.run([sys.executable, str(SCRIPT), "--report-from", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout == report
