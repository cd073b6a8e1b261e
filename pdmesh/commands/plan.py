"""`pdmesh plan`: measure one prefill and one decode worker's capacity on a running mesh
(the ratio method of DESIGN.md) and recommend xPyD for a target request rate; writes the
measured profile (the simulator's `Profile`) to a JSON file.

    pdmesh plan --base-url http://127.0.0.1:8000/v1 --registry 127.0.0.1:50050 \\
        --input-len 256 384 --output-len 32 --slo-ttft 2 --slo-tpot 0.15 --target-rate 1.5
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from pdmesh.commands import auth_flags


def _range(values: list[int]) -> tuple[int, int]:
    if len(values) not in (1, 2) or min(values) < 1 or values[0] > values[-1]:
        raise ValueError(f"a length is N or MIN MAX with 1 <= MIN <= MAX, got {values}")
    return values[0], values[-1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("the mesh")
    m.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="gateway OpenAI API root")
    m.add_argument("--registry", required=True, help="registry HOST:PORT (workers via ListWorkers)")
    m.add_argument("--model", default=None, help="model name (default: first of GET /models)")
    m.add_argument("--tokenizer", default="default", help="tokenizer for the random prompts")
    auth_flags.add_arguments(m)  # ListWorkers and SlowDown are internal RPCs
    w = p.add_argument_group("workload and targets")
    w.add_argument("--input-len", type=int, nargs="+", default=[256, 384], metavar="N",
                   help="prompt tokens: N or MIN MAX (default 256 384)")
    w.add_argument("--output-len", type=int, nargs="+", default=[32], metavar="N",
                   help="output tokens: N or MIN MAX (default 32)")
    w.add_argument("--slo-ttft", type=float, required=True, help="TTFT SLO, seconds")
    w.add_argument("--slo-tpot", type=float, required=True, help="TPOT SLO, seconds")
    w.add_argument("--target-rate", type=float, required=True, help="request rate to size for")
    s = p.add_argument_group("sweeps")
    s.add_argument("--prefill-concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    s.add_argument("--prefill-number-per-client", type=int, default=4,
                   help="requests per client at each prefill point (default 4)")
    s.add_argument("--decode-batch", type=int, nargs="+", default=[4, 8, 16],
                   help="running batch sizes to fill each decode worker to (default 4 8 16)")
    s.add_argument("--decode-output-len", type=int, default=None,
                   help="output tokens of the decode probe (default max(2 x output, 64))")
    s.add_argument("--decode-sleep", type=float, default=1.0,
                   help="SlowDown sleep while the batch fills, seconds (default 1)")
    s.add_argument("--decode-fill-timeout", type=float, default=180.0)
    f = p.add_argument_group("profile")
    f.add_argument("--output", default="plan_profile.json", help="profile JSON to write")
    f.add_argument("--transfer-bandwidth", type=float, default=1.3e9,
                   help="KV transfer bytes/s for the profile (default 1.3e9: Mooncake tcp, loopback)")
    f.add_argument("--max-prefill-tokens", type=int, default=4096)
    f.add_argument("--chunked-prefill-size", type=int, default=2048)
    f.add_argument("--cpu-cores", type=float, default=0.0,
                   help="cores the workers share (one machine), 0 = dedicated (default); "
                        "with --contention-probe, the most the fit may give them")
    f.add_argument("--contention-probe", type=int, nargs="+", default=None, metavar="C",
                   help="also bench the target workload at these concurrencies on the mesh "
                        "as it is and fit the cores its workers effectively share (one "
                        "machine: the gateway, the client and other load take some)")
    f.add_argument("--fit-iters", type=int, default=150)


def _fail(msg: str, code: int = 2) -> int:
    print(f"pdmesh plan: error: {msg}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    try:
        inp, out = _range(args.input_len), _range(args.output_len)
        for name in ("slo_ttft", "slo_tpot", "target_rate", "decode_sleep"):
            if not getattr(args, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        if min(args.prefill_concurrency + args.decode_batch) < 1:
            raise ValueError("concurrencies and batch sizes must be >= 1")
        auth_flags.setup(auth_flags.config_from_args(args, serves=False))
    except ValueError as e:
        return _fail(str(e))
    try:
        return _plan(args, inp, out)
    except (RuntimeError, ValueError, OSError) as e:
        return _fail(str(e), 1)


def _plan(args, inp: tuple[int, int], out: tuple[int, int]) -> int:
    import grpc

    from pdmesh.bench.loadgen import ClientConfig
    from pdmesh.bench.workload import Workload, WorkloadSpec
    from pdmesh.plan import measure, ratio

    try:
        mesh = measure.discover(args.registry)
    except grpc.RpcError as e:
        raise RuntimeError(f"registry {args.registry}: {e.code().name}: {e.details()}") from None
    print(f"mesh: {len(mesh.prefill)} prefill, {len(mesh.decode)} decode; decode KV "
          f"{mesh.kv_tokens} tokens, max running {mesh.max_running}", flush=True)
    cfg = ClientConfig(args.base_url, model=args.model)
    spec = WorkloadSpec(input_len=inp, output_len=out, tokenizer=args.tokenizer)
    wl = Workload.load(spec)
    pre_runs, pcap = _prefill_capacity(args, cfg, spec, wl, mesh)
    dpts, dcap = _decode_capacity(args, cfg, spec, wl, mesh, out[1])
    rec = ratio.recommend(args.target_rate, pcap.req_s, dcap, inp[1], out[1],
                          mesh.kv_tokens, mesh.max_running)
    print("\n" + "\n".join(rec.lines), flush=True)
    _write_profile(args, cfg, wl, mesh, inp, out, pre_runs, dpts, {
        "prefill_capacity_req_s": pcap.req_s, "decode_capacity_req_s": dcap.req_s,
        "recommendation": rec.name, "arithmetic": list(rec.lines)})
    print(f"RECOMMENDATION: {rec.name}")
    return 0


def _prefill_capacity(args, cfg, spec, wl, mesh):
    """The output-length-1 sweep and one prefill worker's capacity at the TTFT SLO."""
    from pdmesh.bench.report import format_table
    from pdmesh.plan import measure, ratio

    runs = measure.measure_prefill(cfg, spec, args.prefill_concurrency,
                                   args.prefill_number_per_client, wl)
    print("\nPrefill sweep (output length 1):\n" + format_table(runs), flush=True)
    # the sweep ran on all P prefill workers: one worker's rate is 1/P of it
    pts = [ratio.PrefillPoint(s.concurrency, s.req_s / len(mesh.prefill), s.ttft.mean)
           for s in runs]
    cap = ratio.prefill_capacity(pts, args.slo_ttft)
    if cap is None:
        raise RuntimeError(f"no prefill point meets TTFT <= {args.slo_ttft} s (lowest mean "
                           f"TTFT {min(p.ttft for p in pts):.3f} s): relax --slo-ttft")
    print(f"prefill capacity: {cap.req_s:.3f} req/s per worker (concurrency "
          f"{cap.concurrency}, mean TTFT {cap.ttft:.3f} s <= {args.slo_ttft} s)", flush=True)
    return runs, cap


def _decode_capacity(args, cfg, spec, wl, mesh, out_len: int):
    """The SlowDown/fill/release sweep and one decode worker's capacity at the TPOT SLO."""
    from pdmesh.plan import measure, ratio

    dlen = args.decode_output_len or max(2 * out_len, 64)
    pts = measure.measure_decode(cfg, spec, mesh.decode, args.decode_batch, dlen,
                                 args.decode_sleep, args.decode_fill_timeout, wl)
    print("\nDecode sweep (SlowDown, fill, release):\n| batch | step ms | gen tok/s | req/s "
          f"at output {out_len} |\n|---|---|---|---|")
    at_out = [dataclasses.replace(p, output_len=out_len) for p in pts]
    for p in at_out:
        print(f"| {p.batch} | {p.step_s * 1000:.1f} | {p.gen_tok_s:.1f} | {p.req_s:.3f} |")
    cap = ratio.decode_capacity(at_out, args.slo_tpot)
    if cap is None:
        raise RuntimeError(f"no decode batch meets TPOT <= {args.slo_tpot} s: relax --slo-tpot "
                           "or measure smaller --decode-batch values")
    return pts, cap


def _write_profile(args, cfg, wl, mesh, inp, out, pre_runs, dpts, results: dict) -> None:
    """Fit the simulator's Profile to the measurements and write it with them."""
    from pdmesh.bench.report import summary_to_dict
    from pdmesh.plan import fit
    from pdmesh.sim.profile import Profile
    from pdmesh.sim.simulator import Deployment

    base = Profile(max_prefill_tokens=args.max_prefill_tokens,
                   chunked_prefill_size=args.chunked_prefill_size,
                   max_running_requests=mesh.max_running, kv_capacity_tokens=mesh.kv_tokens,
                   kv_bytes_per_token=mesh.kv_bytes_per_token,
                   transfer_bandwidth=args.transfer_bandwidth, cpu_cores=args.cpu_cores,
                   first_token_after_step=False, note=f"pdmesh plan, {args.base_url}")
    prof = fit.fit_profile(pre_runs, dpts, base, inp,
                           Deployment(len(mesh.prefill), len(mesh.decode)), args.fit_iters)
    probe = []
    if args.contention_probe:
        prof, probe = _contention(args, cfg, wl, prof, inp, out, mesh)
    prof.save(args.output, extra={
        **results, "contention_probe": [summary_to_dict(s) for s in probe],
        "prefill_runs": [summary_to_dict(s) for s in pre_runs],
        "decode_points": [dataclasses.asdict(p) | {"gen_tok_s": p.gen_tok_s} for p in dpts],
        "slo_ttft": args.slo_ttft, "slo_tpot": args.slo_tpot, "target_rate": args.target_rate,
        "input_len": inp, "output_len": out})
    print(f"\nprofile: prefill step = {prof.prefill_a:.4g} + {prof.prefill_b:.4g}·tokens s, "
          f"decode step = {prof.decode_a:.4g} + {prof.decode_b:.4g}·batch s, overhead "
          f"{prof.client_overhead:.4g} s"
          + (f", {prof.cpu_cores:g} shared cores" if prof.cpu_cores else "")
          + f" -> {args.output}")


def _contention(args, cfg, wl, prof, inp, out, mesh):
    """Bench the target workload as is; fit the profile's cpu_cores to it."""
    import asyncio
    import os

    from pdmesh.bench.loadgen import run_fixed
    from pdmesh.bench.report import format_table
    from pdmesh.plan import fit
    from pdmesh.sim.simulator import Deployment

    runs = [asyncio.run(run_fixed(cfg, wl, c, 4 * c, label="probe", progress=False))[0]
            for c in args.contention_probe]
    print("\nContention probe (target workload, mesh as is):\n" + format_table(runs))
    most = args.cpu_cores or float(os.cpu_count() or 1)
    cores, err = fit.fit_cpu_cores(prof, runs, inp, out,
                                   Deployment(len(mesh.prefill), len(mesh.decode)), most)
    print(f"shared cores fitted: {cores:g} of {most:g} (mean squared log error {err:.4f})")
    return prof.replace(cpu_cores=cores), runs
