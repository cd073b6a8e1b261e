"""Report formats for benchmark runs: the terminal / markdown table and the JSON file.

The table has the columns of ../shared/reference/deepseek-v3-1p1d-b200.md:
concurrency | output tok/s | avg TTFT s | P99 TTFT s | avg TPOT s | avg latency s | req/s | failed
(a "label" column is prepended when any run has a label). Multi-turn runs add a per-turn
table (format_turn_table): turn | requests | avg TTFT s | P99 TTFT s | prompt tokens |
cached tokens | cache hit rate.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional, Sequence

from pdmesh.bench.metrics import Dist, RunSummary, TurnStats

JSON_VERSION = 1
HEADERS = ["concurrency", "output tok/s", "avg TTFT s", "P99 TTFT s", "avg TPOT s",
           "avg latency s", "req/s", "failed"]


def load_point(s: RunSummary) -> str:
    """The table's first column: the concurrency, or `rate=R` for Poisson runs."""
    if s.request_rate is not None:
        rate = f"rate={s.request_rate:g}"
        return rate if s.concurrency is None else f"{rate},c={s.concurrency}"
    return str(s.concurrency)


def _row(s: RunSummary) -> list[str]:
    return [load_point(s), f"{s.output_tok_s:.1f}", f"{s.ttft.mean:.3f}", f"{s.ttft.p99:.3f}",
            f"{s.tpot.mean:.4f}", f"{s.e2e.mean:.2f}", f"{s.req_s:.2f}", str(s.failed)]


def format_table(summaries: Sequence[RunSummary], markdown: bool = False) -> str:
    """One row per run. markdown=True gives a GitHub table like the reference file."""
    labelled = any(s.label for s in summaries)
    headers = (["label"] if labelled else []) + HEADERS
    rows = [([s.label] if labelled else []) + _row(s) for s in summaries]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    lines = [fmt(headers), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(lines)


TURN_HEADERS = ["turn", "requests", "avg TTFT s", "P99 TTFT s", "prompt tokens",
                "cached tokens", "cache hit rate"]


def format_turn_table(s: RunSummary, markdown: bool = False) -> str:
    """The per-turn rows of a multi-turn run, then an "all" row ("" for other runs)."""
    if not s.per_turn:
        return ""
    rows = [[str(t.turn), f"{t.completed}" + (f" ({t.failed} failed)" if t.failed else ""),
             f"{t.ttft.mean:.3f}", f"{t.ttft.p99:.3f}", str(t.prompt_tokens),
             str(t.cached_tokens), f"{t.hit_rate:.1%}"] for t in s.per_turn]
    rows.append(["all", str(s.completed), f"{s.ttft.mean:.3f}", f"{s.ttft.p99:.3f}",
                 str(s.total_input_tokens), str(s.total_cached_tokens),
                 f"{s.cache_hit_rate:.1%}"])
    if markdown:
        lines = ["| " + " | ".join(TURN_HEADERS) + " |", "|" + "---|" * len(TURN_HEADERS)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(TURN_HEADERS)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(TURN_HEADERS), "  ".join("-" * w for w in widths)]
                     + [fmt(r) for r in rows])


def summary_to_dict(s: RunSummary) -> dict[str, Any]:
    """A JSON-ready dict (Dist fields become {mean, median, p90, p99})."""
    d = dataclasses.asdict(s)
    d["errors"] = list(s.errors)
    return d


def summary_from_dict(d: dict[str, Any]) -> RunSummary:
    """Inverse of summary_to_dict; unknown keys are ignored, missing additive ones default."""
    names = {f.name for f in dataclasses.fields(RunSummary)}
    kw = {k: v for k, v in d.items() if k in names}
    for k in ("ttft", "tpot", "itl", "e2e"):
        kw[k] = Dist(**kw[k])
    kw["errors"] = tuple(kw.get("errors", ()))
    kw["per_turn"] = tuple(TurnStats(**{**t, "ttft": Dist(**t["ttft"])})
                           for t in kw.get("per_turn", ()))
    return RunSummary(**kw)


def to_json(summaries: Sequence[RunSummary], config: Optional[dict[str, Any]] = None) -> str:
    """The results file: {"version": 1, "config": {...}, "runs": [summary, ...]}."""
    doc = {"version": JSON_VERSION, "config": config or {},
           "runs": [summary_to_dict(s) for s in summaries]}
    return json.dumps(doc, indent=2)


def load_results(text: str) -> tuple[list[RunSummary], dict[str, Any]]:
    """Parse a results file (or a bare list of summaries) into (summaries, config)."""
    doc = json.loads(text)
    if isinstance(doc, list):
        return [summary_from_dict(d) for d in doc], {}
    if not isinstance(doc, dict) or "runs" not in doc:
        raise ValueError("not a pdmesh bench results file (no 'runs' list)")
    return [summary_from_dict(d) for d in doc["runs"]], dict(doc.get("config") or {})


def from_json(text: str) -> list[RunSummary]:
    """The summaries of a results file written by to_json."""
    return load_results(text)[0]
