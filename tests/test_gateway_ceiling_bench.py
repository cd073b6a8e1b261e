"""benchmarks/gateway_ceiling.py at tiny scale: the pdmesh target with its load split over
2 client processes, 2 fake workers behind a 2-process gateway; the table has a row with
tokens and no errors, every fake got streams, the paced phase's tokens are matched to
the fakes' send logs, and the gateway's CPU covers more than one process."""
from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ceiling_bench_client_procs_and_fakes(tmp_path):
    out = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gateway_ceiling.py"), "--only", "after",
         "--streams", "16", "--seconds", "2", "--max-tokens", "16", "--pace-ms", "10",
         "--client-procs", "2", "--fakes", "2", "--gateway-arg=--processes=2",
         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "over 2 client process(es), 2 fake worker(s)" in text
    row = next(line for line in text.splitlines() if line.startswith("| pdmesh (after"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) > 0  # tok/s
    assert int(cells[-1]) == 0  # errors
    line = next(l for l in proc.stdout.splitlines() if l.startswith("pdmesh (after"))
    r = ast.literal_eval(line.split(": ", 1)[1])
    assert len(r["streams_per_fake"]) == 2 and min(r["streams_per_fake"]) > 0
    assert r["paced_matched"] > 0.9 and not math.isnan(r["added_p50"])
    assert r["clients_cores"] > r["clients_max"] > 0  # both client processes measured
    assert r["fakes_cores"] > r["fakes_max"] > 0
    assert r["gateway_cores"] > r["gateway_max"] > 0  # both gateway processes counted
