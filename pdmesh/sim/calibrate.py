"""Fit a `Profile` so the simulator reproduces a measured 1P1D bench table.

    rows = parse_table("reference.md")                  # markdown table, bench's columns
    fit = fit_table(rows, base_profile, workload, Deployment(1, 1), per_client=4)
    fit.profile, fit.predicted                          # fitted Profile; simulated rows

The free parameters are the prefill and decode time models (prefill_a, prefill_b,
optionally prefill_c; decode_a, decode_b, decode_c), fitted in log space by Nelder-Mead
(numpy only) on squared log-ratio errors of avg TTFT, P99 TTFT (half weight), avg TPOT
and output tok/s over all rows. Limits, transfer and KV sizes come from `base_profile`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pdmesh.sim.profile import Profile
from pdmesh.sim.simulator import Deployment, FixedLoad, SimRequest, Simulator, Workload

# table column -> Row field; headers are matched case-insensitively after normalising
_COLUMNS = {"concurrency": "concurrency", "output tok/s": "output_tps",
            "avg ttft s": "ttft", "p99 ttft s": "ttft_p99", "avg tpot s": "tpot",
            "avg latency s": "latency", "req/s": "req_s"}


@dataclass(frozen=True)
class Row:
    """One concurrency's headline figures (measured or simulated); NaN when absent."""

    concurrency: int
    output_tps: float
    ttft: float
    ttft_p99: float = math.nan
    tpot: float = math.nan
    latency: float = math.nan
    req_s: float = math.nan
    number: int = 0  # requests in the run (0: unknown, use per_client · concurrency)


def _norm(header: str) -> str:
    return re.sub(r"\s+", " ", header.replace("(", " ").replace(")", " ").strip().lower())


def parse_table(path: str | Path) -> list[Row]:
    """Rows of the first markdown table in `path` that has concurrency, output tok/s and
    avg TTFT columns (ours, bench's and the reference's). ValueError if none is found."""
    text = Path(path).read_text()
    lines = [ln.strip() for ln in text.splitlines()]
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            continue
        headers = [_norm(c) for c in line.strip("|").split("|")]
        fields = {j: _COLUMNS[h] for j, h in enumerate(headers) if h in _COLUMNS}
        if not {"concurrency", "output_tps", "ttft"} <= set(fields.values()):
            continue
        rows = []
        for body in lines[i + 2:]:
            if not body.startswith("|"):
                break
            cells = [c.strip() for c in body.strip("|").split("|")]
            vals = {fields[j]: float(cells[j]) for j in fields if j < len(cells)}
            vals["concurrency"] = int(vals["concurrency"])
            rows.append(Row(**vals))
        if rows:
            return rows
    raise ValueError(f"{path}: no markdown table with 'concurrency', 'output tok/s' and "
                     "'avg TTFT s' columns")


def summarize_sim(requests: list[SimRequest], concurrency: int) -> Row:
    """The table's figures from simulated requests (sglang bench_serving definitions:
    TPOT = (e2e - TTFT) / (output - 1) over requests with output > 1; tok/s over the run)."""
    ttft = np.array([r.ttft for r in requests])
    duration = max(r.t_done for r in requests) - min(r.t_send for r in requests)
    tpot = [(r.latency - r.ttft) / (r.output_len - 1) for r in requests if r.output_len > 1]
    return Row(concurrency=concurrency,
               output_tps=sum(r.output_len for r in requests) / duration,
               ttft=float(ttft.mean()), ttft_p99=float(np.percentile(ttft, 99)),
               tpot=float(np.mean(tpot)) if tpot else math.nan,
               latency=float(np.mean([r.latency for r in requests])),
               req_s=len(requests) / duration)


def loads_of(rows: list[Row], per_client: int) -> list[FixedLoad]:
    """The fixed-concurrency load of each row: its own request count, else per_client·P."""
    return [FixedLoad(r.concurrency, r.number or per_client * r.concurrency) for r in rows]


def simulate_rows(profile: Profile, workload: Workload, deployment: Deployment,
                  loads: list[FixedLoad]) -> list[Row]:
    """Simulate each fixed-concurrency load; one Row each."""
    sim = Simulator(profile, deployment, workload)
    return [summarize_sim(sim.run(ld), ld.parallel) for ld in loads]


def rows_from_file(path: str | Path) -> list[Row]:
    """Measured rows from a markdown table (parse_table) or a `pdmesh bench` JSON file."""
    if str(path).endswith(".json"):
        from pdmesh.bench.report import load_results
        runs, _ = load_results(Path(path).read_text())
        rows = [Row(concurrency=s.concurrency, output_tps=s.output_tok_s, ttft=s.ttft.mean,
                    ttft_p99=s.ttft.p99, tpot=s.tpot.mean, latency=s.e2e.mean,
                    req_s=s.req_s, number=s.number) for s in runs if s.concurrency]
        if not rows:
            raise ValueError(f"{path}: no fixed-concurrency runs to calibrate on")
        return rows
    return parse_table(path)


_WEIGHTS = {"ttft": 1.0, "ttft_p99": 0.5, "tpot": 1.0, "output_tps": 1.0}


def table_error(measured: list[Row], predicted: list[Row]) -> float:
    """Mean squared log-ratio error over the weighted columns present in `measured`."""
    total, n = 0.0, 0
    for m, p in zip(measured, predicted):
        for name, w in _WEIGHTS.items():
            mv, pv = getattr(m, name), getattr(p, name)
            if math.isfinite(mv) and mv > 0:
                total += w * math.log(max(pv, 1e-9) / mv) ** 2
                n += 1
    return total / max(n, 1)


def nelder_mead(f, x0: np.ndarray, step: float = 0.5, iters: int = 300,
                tol: float = 1e-7) -> tuple[np.ndarray, float]:
    """Minimise f from x0 (standard Nelder-Mead: reflect 1, expand 2, contract 0.5)."""
    pts = [x0] + [x0 + step * np.eye(len(x0))[i] for i in range(len(x0))]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if vals[-1] - vals[0] < tol:
            break
        centroid = np.mean(pts[:-1], axis=0)
        xr = centroid + (centroid - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = centroid + 2 * (centroid - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = centroid + 0.5 * (pts[-1] - centroid)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:  # shrink towards the best point
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    best = int(np.argmin(vals))
    return pts[best], vals[best]


@dataclass(frozen=True)
class Fit:
    profile: Profile
    predicted: list[Row]
    error: float  # table_error of the fit
    evaluations: int


def initial_guess(rows: list[Row], workload: Workload) -> dict[str, float]:
    """Rough starting point from the lightest row: TPOT ≈ decode_a, TTFT ≈ prefill."""
    light = min(rows, key=lambda r: r.concurrency)
    tpot = light.tpot if math.isfinite(light.tpot) else 0.05
    mean_in = (workload.input_min + workload.input_max) / 2
    mean_ctx = mean_in + (workload.output_min + workload.output_max) / 4
    top = max(r.concurrency for r in rows)
    return {"prefill_a": 0.3 * light.ttft, "prefill_b": 0.3 * light.ttft / mean_in,
            "prefill_c": 0.01 * light.ttft / mean_in ** 2, "decode_a": 0.8 * tpot,
            "decode_b": 0.1 * tpot / top, "decode_c": 0.1 * tpot / (top * mean_ctx),
            "client_overhead": 0.1 * light.ttft, "transfer_latency": 0.05 * light.ttft}


def fit_table(rows: list[Row], base: Profile, workload: Workload, deployment: Deployment,
              per_client: int, params: tuple[str, ...] = ("prefill_a", "prefill_b",
              "decode_a", "decode_b", "decode_c"), iters: int = 300) -> Fit:
    """Fit `params` of `base` (log space) so simulated rows match `rows`."""
    if not rows:
        raise ValueError("no measured rows to fit")
    loads = loads_of(rows, per_client)
    guess = initial_guess(rows, workload)
    x0 = np.log([guess[p] for p in params])
    evals = [0]

    def objective(x: np.ndarray) -> float:
        evals[0] += 1
        prof = base.replace(**dict(zip(params, np.exp(x).tolist())))
        return table_error(rows, simulate_rows(prof, workload, deployment, loads))

    x, err = nelder_mead(objective, x0, iters=iters)
    for step in (0.3, 0.1):  # restarts: Nelder-Mead's simplex can collapse early
        x, err = nelder_mead(objective, x, step=step, iters=max(20, iters // 2))
    best = base.replace(**dict(zip(params, np.exp(x).tolist())))
    return Fit(best, simulate_rows(best, workload, deployment, loads), err, evals[0])
