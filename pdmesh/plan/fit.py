"""Turn plan's measurements into the simulator's `Profile`.

decode step = decode_a + decode_b·batch: least squares over the decode sweep's points.
prefill step = prefill_a + prefill_b·tokens, and the per-request client/gateway overhead:
fitted with the simulator itself to the prefill sweep (output length 1), so that batching
of simultaneous prompts and queueing are accounted for, not folded into the constants.
"""
from __future__ import annotations

import math

import numpy as np

from pdmesh.bench.metrics import RunSummary
from pdmesh.plan.ratio import DecodePoint
from pdmesh.sim.calibrate import Row, fit_table, loads_of, simulate_rows, table_error
from pdmesh.sim.profile import Profile
from pdmesh.sim.simulator import Deployment, Workload


def fit_decode(points: list[DecodePoint]) -> tuple[float, float]:
    """(decode_a, decode_b) of step = a + b·batch; one point (or one batch size) -> b = 0."""
    if not points:
        raise ValueError("no decode points to fit")
    b = np.array([p.batch for p in points], dtype=float)
    s = np.array([p.step_s for p in points], dtype=float)
    if len(set(b)) < 2:
        return float(s.mean()), 0.0
    slope, icpt = np.polyfit(b, s, 1)
    if icpt <= 0:  # keep the model physical: all of it per-request work
        return 1e-6, float(max(0.0, (s / b).mean()))
    return float(icpt), float(max(0.0, slope))


def rows_of(runs: list[RunSummary]) -> list[Row]:
    """Measured rows (bench summaries) in the calibration's form."""
    return [Row(concurrency=s.concurrency, output_tps=s.output_tok_s, ttft=s.ttft.mean,
                ttft_p99=s.ttft.p99, tpot=s.tpot.mean if s.tpot.mean > 0 else math.nan,
                latency=s.e2e.mean, req_s=s.req_s, number=s.number) for s in runs]


def served_input_len(runs: list[RunSummary], input_len: tuple[int, int]) -> tuple[int, int]:
    """`input_len` rescaled to the prompt tokens the server counted in `runs` (random ids
    decode to text that re-tokenizes to slightly different lengths)."""
    done = sum(s.completed for s in runs)
    mean_in = sum(s.total_input_tokens for s in runs) / max(1, done)
    scale = mean_in / ((input_len[0] + input_len[1]) / 2) if mean_in > 0 else 1.0
    lo, hi = (max(1, round(x * scale)) for x in input_len)
    return lo, max(lo, hi)


def fit_profile(prefill_runs: list[RunSummary], decode_points: list[DecodePoint],
                base: Profile, input_len: tuple[int, int], deployment: Deployment,
                iters: int = 150) -> Profile:
    """The Profile of one prefill and one decode worker as measured on `deployment`.

    input_len: the workload's prompt range (rescaled by served_input_len)."""
    a, b = fit_decode(decode_points)
    prof = base.replace(decode_a=a, decode_b=b, decode_c=0.0)
    workload = Workload(*served_input_len(prefill_runs, input_len), 1, 1)
    fit = fit_table(rows_of(prefill_runs), prof, workload, deployment, per_client=1,
                    params=("prefill_a", "prefill_b", "client_overhead"), iters=iters)
    return fit.profile


def fit_cpu_cores(profile: Profile, runs: list[RunSummary], input_len: tuple[int, int],
                  output_len: tuple[int, int], deployment: Deployment,
                  max_cores: float) -> tuple[float, float]:
    """(cores, error): the cores the workers effectively share on one machine, fitted on a
    grid of 0.05 so the simulator reproduces mixed-load bench runs of `deployment`.

    What the gateway, the load generator and anything else on the host use shows up as
    fewer cores left to the workers."""
    rows = rows_of(runs)
    workload = Workload(*served_input_len(runs, input_len), *output_len)
    best = (max_cores, math.inf)
    for cores in np.arange(0.5, max_cores + 1e-9, 0.05):
        pred = simulate_rows(profile.replace(cpu_cores=float(cores)), workload, deployment,
                             loads_of(rows, 4))
        err = table_error(rows, pred)
        if err < best[1]:
            best = (round(float(cores), 2), err)
    return best
