"""serve_gpu's `--rounds R`: every round starts and measures each mode back to back (the
engine alone, then the served modes), so a ratio to the engine alone is taken within one
round, minutes apart at most; the rounds' ratios are then summarised by their median and
range. One round's ratio moved by ±25% from run to run on one H200 host
(benchmarks/results/2026-12-02-gpu-gateway-warm-up-noise.md §4): a target is judged on
the median. Plain functions over serve_gpu's result dicts, no I/O.

A round's result: {mode: {"levels": [{"concurrency", "output_tok_s", "ttft_mean",
"tpot_mean", ...}, ...]}, ...}; a mode that failed has "error" instead of "levels".
"""
from __future__ import annotations

import statistics
from typing import Callable, Sequence

Round = dict


def _level(res: Round, mode: str, c: int) -> dict | None:
    levels = res.get(mode, {}).get("levels") or []
    return next((r for r in levels if r["concurrency"] == c), None)


def per_round(rounds: Sequence[Round], mode: str, c: int,
              fn: Callable[[dict, dict], float]) -> list[float]:
    """fn(mode's level c, the engine's level c) for every round that measured both."""
    out = []
    for res in rounds:
        m, e = _level(res, mode, c), _level(res, "engine", c)
        if m is not None and e is not None and e["output_tok_s"]:
            out.append(fn(m, e))
    return out


def ratio(m: dict, e: dict) -> float:
    """Output tok/s over the engine alone's."""
    return m["output_tok_s"] / e["output_tok_s"]


def ttft_delta_ms(m: dict, e: dict) -> float:
    """Mean TTFT minus the engine alone's, ms."""
    return 1e3 * (m["ttft_mean"] - e["ttft_mean"])


def tpot_rel(m: dict, e: dict) -> float:
    """Mean TPOT over the engine alone's, minus 1."""
    return m["tpot_mean"] / e["tpot_mean"] - 1


def _spread(xs: Sequence[float], fmt: str) -> str:
    return f"median {fmt.format(statistics.median(xs))} (rounds " + \
        ", ".join(fmt.format(x) for x in xs) + ")"


def section(rounds: Sequence[Round], modes: Sequence[str], levels: Sequence[int],
            targets: dict) -> list[str]:
    """Markdown: each served mode's ratio per level per round and its median, then the
    targets judged on the medians."""
    served = [m for m in modes if m != "engine"]
    L = [f"## Over {len(rounds)} rounds (ratio to the engine alone of the same round)", "",
         "| C |" + "".join(f" {m}/engine |" for m in served), "|---:|" + "---|" * len(served)]
    for c in levels:
        cells = []
        for m in served:
            xs = per_round(rounds, m, c, ratio)
            cells.append(_spread(xs, "{:.2f}x") if xs else "-")
        L.append(f"| {c} | " + " | ".join(cells) + " |")
    L += ["", "### Targets, on the medians", ""]
    for m in served:
        for c in targets["ratio_at"]:
            xs = per_round(rounds, m, c, ratio)
            if xs:
                ok = statistics.median(xs) >= targets["ratio"]
                L.append(f"- {m} c={c}: {_spread(xs, '{:.2f}x')} (target >= "
                         f"{targets['ratio']}): {'MET' if ok else 'MISSED'}")
        dt, rel = per_round(rounds, m, 1, ttft_delta_ms), per_round(rounds, m, 1, tpot_rel)
        if dt:
            ok_t = statistics.median(dt) <= targets["ttft_ms"]
            ok_p = statistics.median(rel) <= targets["tpot_rel"]
            L.append(f"- {m} c=1: TTFT {_spread(dt, '{:+.1f} ms')} (target <= "
                     f"+{targets['ttft_ms']:g} ms): {'MET' if ok_t else 'MISSED'}; TPOT "
                     f"{_spread([100 * x for x in rel], '{:+.1f}%')} (target <= "
                     f"+{100 * targets['tpot_rel']:.0f}%): {'MET' if ok_p else 'MISSED'}")
    return L
