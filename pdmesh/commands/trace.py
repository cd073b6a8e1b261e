"""`pdmesh trace show FILE`: print traces from an OTLP/JSON-lines file as span trees.

The file is what `--trace-file` makes every service append to (or a Collector's file
exporter output). By default it prints the newest request trace (one with a GenAI span);
`--trace-id`, `--last N`, `--all` and `--list` choose otherwise; `--summary` prints,
over the chosen traces, each span's median start and duration (where the time goes).
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="trace_command", required=True)
    show = sub.add_parser("show", help="print span trees (name, service, start, duration)")
    show.add_argument("file", help="OTLP/JSON-lines file written with --trace-file")
    show.add_argument("--trace-id", default=None, help="this trace only (hex id, or a prefix)")
    show.add_argument("--last", type=int, default=1,
                      help="the newest N request traces (default 1)")
    show.add_argument("--all", action="store_true",
                      help="every trace, not only requests (registrations too)")
    show.add_argument("--list", action="store_true",
                      help="one line per trace: id, root span, services, duration")
    show.add_argument("--summary", action="store_true",
                      help="over the chosen traces (e.g. --last 100): each span's median and "
                           "P90 start and duration, i.e. where a request's time goes")


def run(args: argparse.Namespace) -> int:
    from pdmesh.telemetry.otlp_file import read_spans
    from pdmesh.telemetry.trace_view import (build_traces, render_trace, summarize_traces,
                                             traces_by_start)

    try:
        roots = build_traces(read_spans(args.file))
    except (OSError, ValueError) as e:
        print(f"pdmesh trace: {e}", file=sys.stderr)
        return 2
    ids = traces_by_start(roots)
    if args.trace_id:
        ids = [t for t in ids if t.startswith(args.trace_id.lower())]
    elif not args.all:
        ids = [t for t in ids if _is_request(roots[t])][-max(1, args.last):]
    if not ids:
        print(f"pdmesh trace: no matching trace in {args.file}", file=sys.stderr)
        return 1
    if args.summary:
        print(summarize_traces([roots[t] for t in ids]))
        return 0
    for t in ids:
        if args.list:
            r = roots[t][0]
            print(f"{t}  {r.name}  [{r.service}]  {r.duration_s * 1e3:.1f} ms")
        else:
            print(render_trace(t, roots[t]), end="\n\n")
    return 0


def _is_request(roots) -> bool:
    stack = list(roots)
    while stack:
        s = stack.pop()
        if "gen_ai.operation.name" in s.attributes:
            return True
        stack.extend(s.children)
    return False
