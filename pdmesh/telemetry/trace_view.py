"""Text rendering of traces read from an OTLP/JSON-lines file (`pdmesh trace show`).

    trace 5f0c…  3 services, 14 spans, 412.3 ms
    POST /v1/chat/completions                 pdmesh-gateway   +0.0 ms   412.3 ms
    ├─ tokenize                               pdmesh-gateway   +0.2 ms     1.1 ms
    └─ chat default                           pdmesh-gateway   +1.4 ms   410.6 ms  gen_ai…
       ├─ route                               ...

Each line: the span's name, its service, its start relative to the trace's first span,
its duration, then the attributes worth reading (gen_ai.*, pdmesh.*, rpc status).
"""
from __future__ import annotations

from collections import defaultdict
from statistics import median

from pdmesh.telemetry.otlp_file import SpanRecord

_SHOWN_PREFIXES = ("gen_ai.", "pdmesh.")
_SHOWN_KEYS = ("rpc.grpc.status_code", "http.response.status_code")


def build_traces(spans: list[SpanRecord]) -> dict[str, list[SpanRecord]]:
    """trace id -> its root spans (children linked, sorted by start); a span whose
    parent is not in the file counts as a root."""
    by_trace: dict[str, dict[str, SpanRecord]] = defaultdict(dict)
    for s in spans:
        s.children = []
        by_trace[s.trace_id][s.span_id] = s
    roots: dict[str, list[SpanRecord]] = {}
    for tid, members in by_trace.items():
        roots[tid] = []
        for s in members.values():
            parent = members.get(s.parent_id)
            (parent.children if parent else roots[tid]).append(s)
        for s in members.values():
            s.children.sort(key=lambda c: c.start_ns)
        roots[tid].sort(key=lambda c: c.start_ns)
    return roots


def traces_by_start(roots: dict[str, list[SpanRecord]]) -> list[str]:
    """Trace ids, oldest first."""
    return sorted(roots, key=lambda t: min(r.start_ns for r in roots[t]))


def render_trace(trace_id: str, roots: list[SpanRecord], width: int = 44) -> str:
    """The span tree of one trace, one span per line."""
    all_spans = list(_walk(roots))
    t0 = min(s.start_ns for s in all_spans)
    end = max(s.end_ns for s in all_spans)
    services = sorted({s.service for s in all_spans})
    lines = [f"trace {trace_id}  {len(services)} services ({', '.join(services)}), "
             f"{len(all_spans)} spans, {(end - t0) / 1e6:.1f} ms"]
    for i, r in enumerate(roots):
        _render(r, "", i == len(roots) - 1, True, t0, width, lines)
    return "\n".join(lines)


def _render(s: SpanRecord, prefix: str, last: bool, root: bool, t0: int, width: int,
            lines: list[str]) -> None:
    branch = "" if root else ("└─ " if last else "├─ ")
    label = (prefix + branch + s.name)[:width].ljust(width)
    kind = s.kind.replace("SPAN_KIND_", "").lower()
    kind = "" if kind == "internal" else f" ({kind})"
    extra = _attrs_text(s)
    err = "  ERROR" if s.status.endswith("ERROR") else ""
    lines.append(f"{label} {s.service + kind:<26} +{(s.start_ns - t0) / 1e6:8.1f} ms "
                 f"{s.duration_s * 1e3:8.1f} ms{err}{'  ' + extra if extra else ''}")
    child_prefix = prefix + ("" if root else ("   " if last else "│  "))
    for i, c in enumerate(s.children):
        _render(c, child_prefix, i == len(s.children) - 1, False, t0, width, lines)


def _attrs_text(s: SpanRecord) -> str:
    shown = {k: v for k, v in s.attributes.items()
             if k.startswith(_SHOWN_PREFIXES) or k in _SHOWN_KEYS}
    return " ".join(f"{k}={_fmt(v)}" for k, v in shown.items())


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def _walk(spans: list[SpanRecord]):
    for s in spans:
        yield s
        yield from _walk(s.children)


def summarize_traces(traces: list[list[SpanRecord]]) -> str:
    """Where the time goes over many request traces: one row per span (its tree path of
    names, "a > b", and its service): the traces it is in, and the median / P90 of its
    start after the trace's first span and of its duration, in ms. Rows in order of
    median start, each name indented by its depth."""
    rows: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for roots in traces:
        spans = list(_walk_paths(roots, ""))
        t0 = min(s.start_ns for _, s in spans)
        for path, s in spans:
            rows[(path, s.service)].append(((s.start_ns - t0) / 1e6, s.duration_s * 1e3))
    width = 46
    lines = [f"{len(traces)} traces; start (after the trace's first span) and duration, ms",
             f"{'span':<{width}} {'service':<16} {'n':>5} {'start p50':>10} {'p90':>8} "
             f"{'dur p50':>9} {'p90':>8}"]
    stats = [(median(v[0] for v in vals), path, service, vals)
             for (path, service), vals in rows.items()]
    for start, path, service, vals in sorted(stats, key=lambda r: r[0]):
        durs = [v[1] for v in vals]
        depth, name = path.count(" > "), path.rsplit(" > ", 1)[-1]
        label = ("  " * depth + name)[:width]  # indented by its depth in the tree
        lines.append(f"{label:<{width}} {service:<16} {len(vals):>5} {start:>10.1f} "
                     f"{_p90([v[0] for v in vals]):>8.1f} {median(durs):>9.1f} "
                     f"{_p90(durs):>8.1f}")
    return "\n".join(lines)


def _walk_paths(spans: list[SpanRecord], prefix: str):
    """(path of names from the root, span) of every span under `spans`."""
    for s in spans:
        path = f"{prefix} > {s.name}" if prefix else s.name
        yield path, s
        yield from _walk_paths(s.children, path)


def _p90(xs: list[float]) -> float:
    """Nearest-rank 90th percentile (the largest of fewer than ten)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))]
