"""`pdmesh bench`: load-test any OpenAI-compatible endpoint (metrics as sglang bench_serving).

    pdmesh bench --base-url http://127.0.0.1:8000/v1 --input-len 128 --output-len 32 \
        --parallel 2 8 --number 8 32 --label 1P1D --output 1p1d.json --plot-dir plots
    pdmesh bench --compare 1p1d.json 2p1d.json --plot-dir plots   # no load: chart + table
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000/v1"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("endpoint")
    g.add_argument("--base-url", default=DEFAULT_URL,
                   help=f"OpenAI API root (default {DEFAULT_URL})")
    g.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    g.add_argument("--model", default=None, help="model name (default: first of GET /models)")
    g.add_argument("--backend", choices=["completions", "chat"], default="completions")
    g.add_argument("--timeout", type=float, default=300.0, help="per-request limit, seconds")
    w = p.add_argument_group("workload")
    w.add_argument("--input-len", type=int, nargs="+", default=[128], metavar="N",
                   help="prompt tokens: N, or MIN MAX (uniform)")
    w.add_argument("--output-len", type=int, nargs="+", default=[32], metavar="N",
                   help="output tokens: N, or MIN MAX (uniform); sent as max_tokens")
    w.add_argument("--tokenizer", default="default",
                   help="'default' (pdmesh default model), a HF/tokenizer folder or a .gguf")
    w.add_argument("--prompt-ids", choices=["sequential", "uniform"], default="sequential",
                   help="sequential = bench_serving random-ids; uniform = iid random ids")
    w.add_argument("--seed", type=int, default=1)
    w.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos")
    w.add_argument("--min-tokens", action="store_true", help="also send min_tokens = max_tokens")
    l = p.add_argument_group("load")
    l.add_argument("--parallel", type=int, nargs="+", default=None, metavar="C",
                   help="fixed-concurrency sweep, e.g. --parallel 4 8 16")
    l.add_argument("--request-rate", type=float, nargs="+", default=None, metavar="R",
                   help="Poisson sweep in req/s ('inf' = all at once)")
    l.add_argument("--max-concurrency", type=int, default=None, help="in-flight cap of rate runs")
    l.add_argument("--number", type=int, nargs="+", default=None, metavar="N",
                   help="requests per run: one value, or one per --parallel/--request-rate "
                        "value (default 4 x concurrency; 32 per rate)")
    l.add_argument("--warmup", type=int, default=1, help="warm-up requests before each run")
    l.add_argument("--slo-ttft", type=float, default=None, help="TTFT SLO, s (goodput)")
    l.add_argument("--slo-tpot", type=float, default=None, help="TPOT SLO, s (goodput)")
    o = p.add_argument_group("output")
    o.add_argument("--label", default="", help="run label (legend in plots), e.g. 1P1D")
    o.add_argument("--output", default=None, help="write summaries + config as JSON here")
    o.add_argument("--plot-dir", default=None, help="write ttft/throughput/tpot PNGs here")
    o.add_argument("--markdown", action="store_true", help="print the table as markdown")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--compare", nargs="+", default=None, metavar="JSON",
                   help="no load: read these result files, print and plot them together")


def _points(args: argparse.Namespace, err) -> list[tuple[str, float, int]]:
    """[(kind, value, number)] for every run; kind is "parallel" or "rate"."""
    pts = [("parallel", float(c)) for c in args.parallel or []]
    pts += [("rate", r) for r in args.request_rate or []]
    if not pts:
        err("give --parallel C... and/or --request-rate R... (or --compare FILE...)")
    if any(v <= 0 for _, v in pts):
        err("--parallel and --request-rate values must be positive")
    nums = args.number
    if nums is None:
        nums = [4 * int(v) if k == "parallel" else 32 for k, v in pts]
    elif len(nums) == 1:
        nums = nums * len(pts)
    elif len(nums) != len(pts):
        err(f"--number takes one value or one per run ({len(pts)}), got {len(nums)}")
    if any(n < 1 for n in nums):
        err("--number values must be >= 1")
    return [(k, v, n) for (k, v), n in zip(pts, nums)]


def _check(args: argparse.Namespace, err) -> None:
    for name in ("input_len", "output_len"):
        v = getattr(args, name)
        if len(v) > 2 or min(v) < 1 or v[0] > v[-1]:
            err(f"--{name.replace('_', '-')} takes N or MIN MAX with 1 <= MIN <= MAX, got {v}")
    if args.timeout <= 0 or args.warmup < 0:
        err("--timeout must be > 0 and --warmup >= 0")
    for name in ("slo_ttft", "slo_tpot"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            err(f"--{name.replace('_', '-')} must be positive")


async def _sweep(args: argparse.Namespace, points) -> tuple[list, dict[str, Any]]:
    from pdmesh.bench.loadgen import ClientConfig, resolve_model, run_fixed, run_rate
    from pdmesh.bench.workload import Workload, WorkloadSpec

    spec = WorkloadSpec((args.input_len[0], args.input_len[-1]),
                        (args.output_len[0], args.output_len[-1]), args.tokenizer,
                        args.prompt_ids, args.seed)
    cfg = await resolve_model(ClientConfig(
        args.base_url, args.model, args.api_key, args.backend, args.timeout,
        ignore_eos=not args.no_ignore_eos, min_tokens=args.min_tokens))
    workload = Workload.load(spec)
    common = dict(label=args.label, slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot,
                  warmup_requests=args.warmup, progress=not args.no_progress)
    summaries = []
    for kind, value, number in points:
        if kind == "parallel":
            s, _ = await run_fixed(cfg, workload, int(value), number, **common)
        else:
            s, _ = await run_rate(cfg, workload, value, number,
                                  max_concurrency=args.max_concurrency, **common)
        print(f"[bench] {kind}={value:g} number={number}: {s.completed} ok, {s.failed} failed, "
              f"{s.output_tok_s:.1f} out tok/s, TTFT {s.ttft.mean:.3f} s, "
              f"TPOT {s.tpot.mean:.4f} s" + (f" ({s.errors[0]})" if s.errors else ""),
              flush=True)
        summaries.append(s)
    config = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "api_key"}
    config.update(model=cfg.model, started=datetime.datetime.now(datetime.timezone.utc)
                  .isoformat(timespec="seconds"), points=[list(p) for p in points])
    return summaries, config


def _compare(args: argparse.Namespace, err) -> list:
    from pdmesh.bench.report import load_results

    per_file = []
    for f in args.compare:
        try:
            runs, _ = load_results(Path(f).read_text())
        except (OSError, ValueError) as e:
            err(f"--compare {f}: {e}")
        per_file.append((Path(f).stem, [s if s.label else _relabel(s, Path(f).stem)
                                         for s in runs]))
    labels = [lb for _, runs in per_file for lb in dict.fromkeys(r.label for r in runs)]
    clash = {x for x in labels if labels.count(x) > 1}  # same label in two files: add the stem
    return [_relabel(s, f"{s.label} ({stem})") if s.label in clash else s
            for stem, runs in per_file for s in runs]


def _relabel(s, label: str):
    import dataclasses
    return dataclasses.replace(s, label=label)


def run(args: argparse.Namespace) -> int:
    from pdmesh.bench.plots import group_by_label, plot_runs
    from pdmesh.bench.report import format_table, to_json

    def err(msg: str) -> None:
        print(f"pdmesh bench: error: {msg}", file=sys.stderr)
        raise SystemExit(2)

    if args.compare:
        summaries, config = _compare(args, err), {"compare": args.compare}
    else:
        _check(args, err)
        try:
            summaries, config = asyncio.run(_sweep(args, _points(args, err)))
        except (RuntimeError, ValueError, OSError) as e:  # unreachable endpoint, bad tokenizer
            print(f"pdmesh bench: {e}", file=sys.stderr)
            return 1
    print(format_table(summaries, markdown=args.markdown))
    if args.output and not args.compare:
        Path(args.output).write_text(to_json(summaries, config))
        print(f"[bench] results written to {args.output}")
    if args.plot_dir:
        paths = plot_runs(group_by_label(summaries), args.plot_dir)
        print("[bench] plots: " + ", ".join(map(str, paths)))
    return 0 if all(s.failed == 0 for s in summaries) else 1
