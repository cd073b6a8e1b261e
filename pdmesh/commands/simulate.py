"""`pdmesh simulate`: predict bench tables of PxDy deployments with the discrete-event
simulator (pdmesh/sim), calibrated by a profile file or fitted to a measured table.

    pdmesh simulate --profile plan.json --deployments 1P1D 2P1D --parallel 4 8 --number 16 32
    pdmesh simulate --calibrate-from-table reference.md --deployment 1P1D \\
        --input-len 3000 4000 --output-len 600 600 --number-per-client 4 \\
        --max-prefill-tokens 16384 --chunked-prefill-size 8192 --max-running-requests 512 \\
        --kv-capacity-tokens 985000 --first-token-after-step --deployments 1P1D 2P1D
    pdmesh simulate --profile plan.json --workload multi-turn --turns 8 --system-prompt-len 1024 \
        --input-len 64 --output-len 32 --think-time 1 --parallel 4 --conversations 8 \
        --deployments 1P1D 2P1D [--no-prefix-cache]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Profile fields settable from the command line (flag -> field, type)
_PROFILE_FLAGS = {
    "--max-prefill-tokens": ("max_prefill_tokens", int),
    "--chunked-prefill-size": ("chunked_prefill_size", int),
    "--max-running-requests": ("max_running_requests", int),
    "--kv-capacity-tokens": ("kv_capacity_tokens", int),
    "--kv-bytes-per-token": ("kv_bytes_per_token", float),
    "--transfer-bandwidth": ("transfer_bandwidth", float),
    "--transfer-latency": ("transfer_latency", float),
    "--cpu-cores": ("cpu_cores", float),
    "--client-overhead": ("client_overhead", float),
    "--page-size": ("page_size", int),
}
_MT_DEFAULTS = {"turns": 8, "system_prompt_len": 1024, "think_time": 0.0,
                "conversations": None}


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("calibration (one of)")
    src.add_argument("--profile", help="profile JSON written by `pdmesh plan` (or --save-profile)")
    src.add_argument("--calibrate-from-table", metavar="FILE",
                     help="fit the profile to a measured table: markdown with concurrency / "
                          "output tok/s / avg TTFT s / ... columns, or a `pdmesh bench` JSON")
    p.add_argument("--deployment", default="1P1D",
                   help="the deployment the calibration table was measured on (default 1P1D)")
    p.add_argument("--number-per-client", type=int, default=4,
                   help="table rows ran --number = this x concurrency (default 4, evalscope's "
                        "--parallel P --number 4P); also the default --number of sweeps")
    p.add_argument("--fit-iters", type=int, default=300, help="Nelder-Mead iterations (300)")
    p.add_argument("--save-profile", metavar="FILE", help="write the profile used to FILE")
    for flag, (field, typ) in _PROFILE_FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=f"profile field {field}")
    p.add_argument("--first-token-after-step", action=argparse.BooleanOptionalAction,
                   default=None, help="token 1 reaches the client after the first decode "
                   "step (SGLang) instead of when the request joins the batch (pdmesh)")
    wl = p.add_argument_group("workload and load")
    wl.add_argument("--input-len", type=int, nargs="+", metavar="N", default=[128],
                    help="prompt tokens: N or MIN MAX (uniform), default 128")
    wl.add_argument("--output-len", type=int, nargs="+", metavar="N", default=[32],
                    help="output tokens: N or MIN MAX (uniform), default 32")
    wl.add_argument("--seed", type=int, default=0)
    wl.add_argument("--workload", choices=["random", "multi-turn"], default="random",
                    help="multi-turn: conversations sharing a system prompt, with growing "
                         "history (--input-len = user message, --output-len = reply, "
                         "--parallel = conversations at once); needs --profile")
    wl.add_argument("--turns", type=int, default=None, help="multi-turn: turns (default 8)")
    wl.add_argument("--system-prompt-len", type=int, default=None,
                    help="multi-turn: shared system prompt tokens (default 1024)")
    wl.add_argument("--think-time", type=float, default=None,
                    help="multi-turn: seconds between a reply and the next turn (default 0)")
    wl.add_argument("--conversations", type=int, nargs="+", default=None,
                    help="multi-turn: conversations per --parallel value (one, or one per "
                         "value; default: the concurrency)")
    p.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="the prefill workers' prefix cache (profile field prefix_cache, "
                        "default on; matters for multi-turn only)")
    wl.add_argument("--deployments", nargs="+", default=None,
                    help="deployments to simulate, e.g. 1P1D 2P1D 1P2D (default: --deployment)")
    wl.add_argument("--parallel", type=int, nargs="+", default=None,
                    help="concurrency sweep (default: the table's concurrencies, else 1 4 16)")
    wl.add_argument("--number", type=int, nargs="+", default=None,
                    help="requests per --parallel value (one, or one per value)")
    wl.add_argument("--rate", type=float, nargs="+", default=None,
                    help="Poisson request rates instead of --parallel")
    p.add_argument("--slo-ttft", type=float, default=None, help="TTFT SLO, s (goodput)")
    p.add_argument("--slo-tpot", type=float, default=None, help="TPOT SLO, s (goodput)")
    p.add_argument("--compare", nargs="+", metavar="JSON", default=None,
                   help="`pdmesh bench` result files labelled with their deployment (e.g. "
                        "--label 2P1D): simulate the same loads, print measured / simulated")
    p.add_argument("--json", metavar="FILE", help="write the runs as bench's JSON results")
    p.add_argument("--markdown", action="store_true", help="print markdown tables")


def _fail(msg: str) -> int:
    print(f"pdmesh simulate: error: {msg}", file=sys.stderr)
    return 2


def _base_profile(args):
    from pdmesh.sim.profile import Profile
    base = Profile.load(args.profile) if args.profile else Profile()
    changes = {f: getattr(args, flag[2:].replace("-", "_")) for flag, (f, _) in
               _PROFILE_FLAGS.items()}
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.first_token_after_step is not None:
        changes["first_token_after_step"] = args.first_token_after_step
    if args.prefix_cache is not None:
        changes["prefix_cache"] = args.prefix_cache
    return base.replace(**changes)


def _loads(args, table_rows):
    from pdmesh.sim.simulator import FixedLoad, RateLoad
    if args.rate:
        nums = args.number or [args.number_per_client * 16]
        if len(nums) not in (1, len(args.rate)):
            raise ValueError("--number takes one value or one per --rate value")
        return [RateLoad(r, nums[min(i, len(nums) - 1)], args.seed)
                for i, r in enumerate(args.rate)]
    par = args.parallel or ([r.concurrency for r in table_rows] if table_rows else [1, 4, 16])
    if args.workload == "multi-turn":
        convs = args.conversations or par
        if len(convs) not in (1, len(par)):
            raise ValueError("--conversations takes one value or one per --parallel value")
        if min(convs) < 1 or min(par) < 1:
            raise ValueError("--parallel and --conversations values must be >= 1")
        return [FixedLoad(c, convs[min(i, len(convs) - 1)]) for i, c in enumerate(par)]
    if args.number and len(args.number) not in (1, len(par)):
        raise ValueError("--number takes one value or one per --parallel value")
    return [FixedLoad(c, args.number[min(i, len(args.number) - 1)] if args.number
                      else args.number_per_client * c) for i, c in enumerate(par)]


def _multi_turn_check(args) -> str | None:
    """The error message for multi-turn flags that do not fit, else None (sets defaults)."""
    given = [f"--{n.replace('_', '-')}" for n in _MT_DEFAULTS if getattr(args, n) is not None]
    if args.workload != "multi-turn":
        return f"{', '.join(given)} need --workload multi-turn" if given else None
    if args.calibrate_from_table or args.compare or args.rate:
        return ("--workload multi-turn takes --profile and --parallel (fit a profile first: "
                "--calibrate-from-table FILE --save-profile P.json); not "
                "--calibrate-from-table, --compare or --rate")
    if args.number:
        return "--workload multi-turn counts --conversations, not --number"
    for name, default in _MT_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return None


def run(args: argparse.Namespace) -> int:
    from pdmesh.bench.report import format_table, format_turn_table, to_json
    from pdmesh.sim import calibrate
    from pdmesh.sim.report import compare_table, simulate_run
    from pdmesh.sim.simulator import Deployment, MultiTurn, Workload

    if bool(args.profile) == bool(args.calibrate_from_table):
        return _fail("give exactly one of --profile FILE and --calibrate-from-table FILE")
    if msg := _multi_turn_check(args):
        return _fail(msg)
    try:
        base = _base_profile(args)
        for name in ("input_len", "output_len"):
            v = getattr(args, name)
            if len(v) > 2:
                raise ValueError(f"--{name.replace('_', '-')} takes N or MIN MAX")
        workload = Workload(args.input_len[0], args.input_len[-1], args.output_len[0],
                            args.output_len[-1], seed=args.seed)
        if args.workload == "multi-turn":
            workload = MultiTurn(args.turns, args.system_prompt_len, args.input_len[0],
                                 args.input_len[-1], args.output_len[0], args.output_len[-1],
                                 args.think_time, seed=args.seed)
        measured_on = Deployment.parse(args.deployment)
        deployments = [Deployment.parse(d) for d in (args.deployments or [args.deployment])]
        rows = calibrate.rows_from_file(args.calibrate_from_table) \
            if args.calibrate_from_table else []
        loads = _loads(args, rows)
    except (ValueError, OSError) as e:
        return _fail(str(e))
    profile = base
    if rows:
        fit = calibrate.fit_table(rows, base, workload, measured_on, args.number_per_client,
                                  iters=args.fit_iters)
        profile = fit.profile
        print(f"Fit of {measured_on} to {args.calibrate_from_table} ({fit.evaluations} "
              f"simulations, mean squared log error {fit.error:.4f}):")
        print(_profile_line(profile))
        print(compare_table(rows, fit.predicted) + "\n")
    if args.save_profile:
        profile.save(args.save_profile)
    if args.compare:
        try:
            _compare(args.compare, profile, workload)
        except (ValueError, OSError) as e:
            return _fail(str(e))
        return 0
    runs = []
    for dep in deployments:
        summaries = [simulate_run(profile, dep, workload, ld, label=str(dep),
                                  slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot)
                     for ld in loads]
        runs += summaries
        what = "user message" if args.workload == "multi-turn" else "input"
        print(f"Simulated {dep} ({what} {args.input_len[0]}-{args.input_len[-1]}, output "
              f"{args.output_len[0]}-{args.output_len[-1]} tokens):")
        print(format_table(summaries, markdown=args.markdown) + "\n")
        for s in summaries:
            if s.per_turn:
                print(f"{dep} c={s.concurrency}, {s.number // args.turns} conversations x "
                      f"{args.turns} turns, system prompt {args.system_prompt_len} tokens, "
                      f"prefix cache {'on' if profile.prefix_cache else 'off'}: per turn")
                print(format_turn_table(s, markdown=args.markdown) + "\n")
    if args.json:
        Path(args.json).write_text(to_json(runs, {"profile": profile.to_dict(),
                                                  "simulated": True}))
    return 0


def _profile_line(p) -> str:
    return (f"  prefill step = {p.prefill_a:.4g} + {p.prefill_b:.4g}·tokens"
            + (f" + {p.prefill_c:.3g}·tokens²" if p.prefill_c else "") + " s; "
            f"decode step = {p.decode_a:.4g} + {p.decode_b:.4g}·batch + "
            f"{p.decode_c:.4g}·context_tokens s")


def _compare(files: list[str], profile, workload) -> None:
    """For each bench file: its deployment (from the runs' label) simulated at its loads."""
    from pdmesh.bench.report import load_results
    from pdmesh.sim.calibrate import loads_of, rows_from_file, simulate_rows
    from pdmesh.sim.report import compare_table
    from pdmesh.sim.simulator import Deployment

    for f in files:
        runs, _ = load_results(Path(f).read_text())
        label = next((s.label for s in runs if s.label), "")
        try:
            dep = Deployment.parse(label)
        except ValueError:
            raise ValueError(f"{f}: label the bench runs with their deployment (--label 2P1D), "
                             f"got {label!r}") from None
        rows = rows_from_file(f)
        pred = simulate_rows(profile, workload, dep, loads_of(rows, 4))
        print(f"{dep}: measured ({f}) / simulated:\n" + compare_table(rows, pred) + "\n")
