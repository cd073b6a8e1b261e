"""Simulated requests -> bench's RequestRecord / RunSummary, and the fit comparison table.

The simulator's output goes through exactly the code `pdmesh bench` uses
(`pdmesh.bench.metrics.summarize`, `pdmesh.bench.report.format_table`), so a simulated
table and a measured one are computed the same way.
"""
from __future__ import annotations

import math
from typing import Sequence

from pdmesh.bench.metrics import RequestRecord, RunSummary, summarize
from pdmesh.sim.calibrate import Row
from pdmesh.sim.profile import Profile
from pdmesh.sim.simulator import (Deployment, FixedLoad, MultiTurn, RateLoad, SimRequest,
                                  Simulator, Workload)


def to_records(requests: Sequence[SimRequest]) -> list[RequestRecord]:
    """One RequestRecord per simulated request (start = send time in simulated seconds)."""
    out = []
    for r in requests:
        chunks = sorted(set(r.token_times))  # tokens that arrive together are one chunk
        itl = [b - a for a, b in zip(chunks, chunks[1:])]
        out.append(RequestRecord(ok=True, error="", prompt_tokens=r.input_len,
                                 output_tokens=r.output_len, ttft=r.ttft, e2e=r.latency,
                                 itl=itl, start=r.t_send, cached_tokens=r.cached,
                                 turn=r.turn))
    return out


def simulate_run(profile: Profile, deployment: Deployment, workload: Workload | MultiTurn,
                 load: FixedLoad | RateLoad, label: str = "", slo_ttft: float | None = None,
                 slo_tpot: float | None = None) -> RunSummary:
    """Simulate one load point and summarize it as bench would."""
    reqs = Simulator(profile, deployment, workload).run(load)
    fixed = isinstance(load, FixedLoad)
    return summarize(to_records(reqs), label=label,
                     concurrency=load.parallel if fixed else None,
                     request_rate=None if fixed else load.rate,
                     slo_ttft=slo_ttft, slo_tpot=slo_tpot)


def _cell(measured: float, predicted: float, fmt: str) -> str:
    if not math.isfinite(measured):
        return format(predicted, fmt)
    err = (predicted - measured) / measured * 100 if measured else math.nan
    return f"{format(measured, fmt)} / {format(predicted, fmt)} ({err:+.0f}%)"


def compare_table(measured: Sequence[Row], predicted: Sequence[Row]) -> str:
    """Markdown table: each cell 'measured / simulated (error %)'."""
    cols = [("output tok/s", "output_tps", ".1f"), ("avg TTFT s", "ttft", ".2f"),
            ("P99 TTFT s", "ttft_p99", ".2f"), ("avg TPOT s", "tpot", ".4f"),
            ("avg latency s", "latency", ".1f"), ("req/s", "req_s", ".2f")]
    lines = ["| concurrency | " + " | ".join(c[0] + " meas / sim" for c in cols) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for m, p in zip(measured, predicted):
        cells = [_cell(getattr(m, f), getattr(p, f), fmt) for _, f, fmt in cols]
        lines.append(f"| {m.concurrency} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
