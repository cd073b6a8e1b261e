"""`pdmesh bench`: load-test any OpenAI-compatible endpoint (metrics as sglang bench_serving).

    pdmesh bench --base-url http://127.0.0.1:8000/v1 --input-len 128 --output-len 32 \
        --parallel 2 8 --number 8 32 --label 1P1D --output 1p1d.json --plot-dir plots
    pdmesh bench --compare 1p1d.json 2p1d.json --plot-dir plots   # no load: chart + table
    pdmesh bench --backend chat --workload multi-turn --turns 8 --system-prompt-len 1024 \
        --input-len 64 --output-len 32 --think-time 1 --parallel 4 --conversations 8
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
    w.add_argument("--workload", choices=["random", "multi-turn"], default="random",
                   help="random: independent prompts of --input-len; multi-turn: "
                        "conversations with a shared system prompt and growing history "
                        "(--input-len = each user message, --output-len = each reply; "
                        "--parallel C = C conversations at once)")
    w.add_argument("--turns", type=int, default=None,
                   help="multi-turn: turns per conversation (default 8)")
    w.add_argument("--system-prompt-len", type=int, default=None, metavar="T",
                   help="multi-turn: tokens of the system prompt all conversations share "
                        "(default 1024; 0 = none)")
    w.add_argument("--think-time", type=float, default=None, metavar="S",
                   help="multi-turn: seconds between a reply and the next turn (default 0)")
    w.add_argument("--conversations", type=int, nargs="+", default=None, metavar="N",
                   help="multi-turn: conversations per run, one value or one per --parallel "
                        "value (default: the concurrency)")
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
    multi = args.workload == "multi-turn"
    flag = "--conversations" if multi else "--number"
    nums = args.conversations if multi else args.number
    if nums is None:
        nums = [(1 if multi else 4) * int(v) if k == "parallel" else 32 for k, v in pts]
    elif len(nums) == 1:
        nums = nums * len(pts)
    elif len(nums) != len(pts):
        err(f"{flag} takes one value or one per run ({len(pts)}), got {len(nums)}")
    if any(n < 1 for n in nums):
        err(f"{flag} values must be >= 1")
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
    mt_flags = [f"--{n.replace('_', '-')}" for n in _MT_DEFAULTS
                if getattr(args, n) is not None]
    if args.workload != "multi-turn":
        if mt_flags:
            err(f"{', '.join(mt_flags)} need --workload multi-turn")
        return
    if args.request_rate:
        err("--workload multi-turn runs fixed concurrency (--parallel C: C conversations at "
            "once); --request-rate is not supported")
    if args.number is not None:
        err("--workload multi-turn counts --conversations, not --number")
    if args.max_concurrency is not None:
        err("--max-concurrency is for --request-rate runs; multi-turn uses --parallel")
    for name, default in _MT_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.turns < 1:
        err(f"--turns must be >= 1, got {args.turns}")
    if args.system_prompt_len < 0:
        err(f"--system-prompt-len must be >= 0, got {args.system_prompt_len}")
    if not args.think_time >= 0:
        err(f"--think-time must be >= 0, got {args.think_time}")


_MT_DEFAULTS = {"turns": 8, "system_prompt_len": 1024, "think_time": 0.0,
                "conversations": None}


async def _sweep(args: argparse.Namespace, points) -> tuple[list, dict[str, Any]]:
    from pdmesh.bench.loadgen import ClientConfig, resolve_model, run_fixed, run_rate
    from pdmesh.bench.workload import Workload, WorkloadSpec

    spec = WorkloadSpec((args.input_len[0], args.input_len[-1]),
                        (args.output_len[0], args.output_len[-1]), args.tokenizer,
                        args.prompt_ids, args.seed)
    cfg = await resolve_model(ClientConfig(
        args.base_url, args.model, args.api_key, args.backend, args.timeout,
        ignore_eos=not args.no_ignore_eos, min_tokens=args.min_tokens))
    common = dict(label=args.label, slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot,
                  warmup_requests=args.warmup, progress=not args.no_progress)
    mt = None
    if args.workload == "multi-turn":
        from pdmesh.bench.multiturn import MultiTurnSpec, MultiTurnWorkload
        mt = MultiTurnWorkload.load(MultiTurnSpec(
            args.turns, args.system_prompt_len, spec.input_len, spec.output_len,
            args.think_time, args.tokenizer, args.seed))
    else:
        workload = Workload.load(spec)
    summaries = []
    for kind, value, number in points:
        if mt is not None:
            from pdmesh.bench.multiturn import run_multi_turn
            s, _ = await run_multi_turn(cfg, mt, int(value), number, **common)
        elif kind == "parallel":
            s, _ = await run_fixed(cfg, workload, int(value), number, **common)
        else:
            s, _ = await run_rate(cfg, workload, value, number,
                                  max_concurrency=args.max_concurrency, **common)
        count = f"conversations={number}" if mt is not None else f"number={number}"
        print(f"[bench] {kind}={value:g} {count}: {s.completed} ok, {s.failed} failed, "
              f"{s.output_tok_s:.1f} out tok/s, TTFT {s.ttft.mean:.3f} s, "
              f"TPOT {s.tpot.mean:.4f} s" + (f" ({s.errors[0]})" if s.errors else ""),
              flush=True)
        if s.per_turn:
            print(f"[bench] {number} conversations x {mt.spec.turns} turns, system prompt "
                  f"{mt.system_prompt_tokens} tokens; prefix cache hit rate "
                  f"{s.cache_hit_rate:.1%}", flush=True)
        summaries.append(s)
    config = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "api_key"}
    config.update(model=cfg.model, started=datetime.datetime.now(datetime.timezone.utc)
                  .isoformat(timespec="seconds"), points=[list(p) for p in points])
    if mt is not None:
        config["system_prompt_tokens"] = mt.system_prompt_tokens
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
    from pdmesh.bench.report import format_table, format_turn_table, to_json

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
    for s in summaries:
        if s.per_turn:
            head = f"{s.label} " if s.label else ""
            print(f"\n{head}c={s.concurrency}: per turn (cache hit rate = cached / prompt "
                  f"tokens, from usage.prompt_tokens_details.cached_tokens)")
            print(format_turn_table(s, markdown=args.markdown))
    if args.output and not args.compare:
        Path(args.output).write_text(to_json(summaries, config))
        print(f"[bench] results written to {args.output}")
    if args.plot_dir:
        paths = plot_runs(group_by_label(summaries), args.plot_dir)
        print("[bench] plots: " + ", ".join(map(str, paths)))
    return 0 if all(s.failed == 0 for s in summaries) else 1
