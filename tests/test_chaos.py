"""CI-sized chaos run (benchmarks/chaos.py): >= 50 faults at random over every phase on
`pdmesh serve --chaos` (1P1D here, to start fast), each followed by the checks: every
request ended with the reference greedy tokens or a clear error within its deadline, no
page left in use on an idle live worker, no unexpected exit, restarted processes rejoin."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from pdmesh import auth

ROOT = Path(__file__).resolve().parent.parent


def _chaos_module():
    spec = importlib.util.spec_from_file_location("chaos_bench", ROOT / "benchmarks" / "chaos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos_bench"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_chaos_ci_subset(tmp_path):
    chaos = _chaos_module()
    args = chaos.build_parser().parse_args([
        "--faults", "50", "--prefill", "1", "--decode", "1", "--requests", "3",
        "--process-share", "0.06", "--port", "0", "--seed", "7",
        "--out", str(tmp_path / "chaos.md"), "--log", str(tmp_path / "serve.log")])
    try:
        run = chaos.execute(args)
    finally:
        auth.configure(auth.PROCESS)
    assert run.faults_done >= 50
    assert chaos.failures(run) == 0 and not run.bugs, run.bugs
    phases = {phase for (_, phase) in run.rows}
    assert phases == set(chaos.PHASES), phases
    total_ok = sum(r.ok for r in run.rows.values())
    assert total_ok > 50  # most requests survive their fault (retries, other pair)
    print((tmp_path / "chaos.md").read_text())


def test_kinds_narrow_the_faults_picked():
    """--kinds 'hb_,sigstop': only heartbeat faults and SIGSTOPs, in every phase that
    has one; a phase with process faults only picks those."""
    import random
    from types import SimpleNamespace

    chaos = _chaos_module()
    args = chaos.build_parser().parse_args(["--kinds", "hb_,sigstop", "--process-share", "0"])
    run = SimpleNamespace(rng=random.Random(0), args=args)
    picked = {chaos.Run.pick(run) for _ in range(400)}
    assert picked and all("hb_" in k or "sigstop" in k for _, k in picked)
    assert ("queued", "proc:sigstop:P") in picked  # its only wanted kind is a process
    assert {p for p, _ in picked} == set(chaos.PHASES)
