"""Serving overhead on one GPU: the runtime Engine alone vs `pdmesh serve` colocated vs 1P1D.

    python3 benchmarks/serve_gpu.py                                  # the H200 run (defaults)
    python3 benchmarks/serve_gpu.py --device cpu --concurrency 1 2 --output-len 4 --no-profile

On the device tool's H200 (offline): here `bash scripts/gpu_wheels.sh` (builds .whl/); call 1
carries .whl/w .whl/m .whl/ga and runs `source benchmarks/gpu_env.sh` (installs, checks
imports); call 2, at once (the machine stays warm 30 s), carries .whl/gb and runs
    source benchmarks/gpu_env.sh; python3 benchmarks/serve_gpu.py --out /tmp/sg \
      --git-label "<git rev-parse --short HEAD here>" | tee $OUT/log.txt
    tar czf $OUT/sg.tgz -C /tmp sg
(about 6 minutes on an H200). Three modes, one after the other, on the same workload:

  engine     pdmesh's runtime `Engine` in a subprocess of this script, driven closed-loop: C
             requests added, each finished one replaced by the next until N are done; TTFT
             is add_request -> the step that returned its first token, e2e -> its last.
  colocated  `pdmesh serve --prefill 0 --decode 0 --colocated 1` (registry, one colocated
             worker, gateway).
  1p1d       `pdmesh serve --prefill 1 --decode 1`: two worker processes on the same GPU,
             KV moved by Mooncake.
The served modes are measured with pdmesh bench's load generator (pdmesh/bench/loadgen.py):
OpenAI /v1/completions, streaming, ignore_eos, C in flight, N requests; the engine's records
go through the same `summarize` (sglang bench_serving definitions: TPOT = (e2e - TTFT) /
(output tokens - 1), output tok/s = output tokens / (first send -> last finish)).

Workload: `--input-len` random token ids (bench_serving "random-ids", fixed --seed) decoded
to text, so the engine and the gateway tokenize the same text (~280 tokens re-encoded);
--output-len tokens, ignore_eos, greedy. N = max(--min-requests, --requests-factor x C).
Before each mode a warm-up burst (min(64, max C) requests, 16 tokens), and one request
before each level.

Also printed: each level's forward steps per engine, decode and prefill (the engine's
own counters; a worker's `pdmesh_worker_{decode,prefill}_steps_total`); each service's ready time in the served modes (`pdmesh serve` starts registry,
workers, gateway one after the other; a child's time is from the previous child's
"listening on" line to its own, and the total is to `pdmesh serve: ready`); and, at
--profile-concurrency, where the time goes: `py-spy record --format raw` (--nonblocking,
--threads) for --profile-seconds on the engine process, the gateway, each worker and this
client, with each process's CPU use from /proc over the same window; the top functions by
own (leaf) samples. Everything raw (logs, py-spy files, results.json, report.md) is written
under --out.

Targets (the issue's): colocated and 1P1D output tok/s >= 0.8x engine alone at 64 and 256;
at concurrency 1 TTFT within 5 ms of the engine's and TPOT within 10%; worker ready <= 20 s.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

# its parts, beside it in benchmarks/
from serve_common import MODES, ROOT, fmt_steps, level_sizes, log, profile_number, summary_dict
from serve_mesh import run_served_mode
from serve_profile import Profiler, find_py_spy, summarize_raw
from serve_report import device_name, git_state, report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M), HF folder, .gguf")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu: PDMESH_DEVICE for all")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256], metavar="C")
    p.add_argument("--input-len", type=int, default=268,
                   help="prompt token ids drawn (default 268)")
    p.add_argument("--output-len", type=int, default=128, help="output tokens (default 128)")
    p.add_argument("--requests-factor", type=float, default=2.0,
                   help="N = max(--min-requests, factor x C) per level (default 2)")
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up burst per mode (default min(64, max C)); 0 = none")
    p.add_argument("--max-running-requests", type=int, default=None,
                   help="engine and workers alike (default: EngineConfig's / PDMESH_* env)")
    p.add_argument("--kv-cache-bytes", type=int, default=None,
                   help="engine and workers alike (default: EngineConfig's / PDMESH_* env)")
    p.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                   help="extra `pdmesh serve --worker-arg` (served modes only)")
    p.add_argument("--gateway-arg", action="append", default=[], metavar="ARG")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra `pdmesh serve` argument (served modes), e.g. --serve-arg=--gpus=0,1")
    p.add_argument("--ready-timeout", type=float, default=600.0,
                   help="seconds `pdmesh serve` may take to be ready")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request limit, seconds")
    p.add_argument("--profile-concurrency", type=int, default=64)
    p.add_argument("--profile-seconds", type=float, default=5.0)
    p.add_argument("--profile-top", type=int, default=15)
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy / CPU profile")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every mode R times, back to back per round; targets are judged "
                        "on the median of the rounds' ratios (serve_rounds.py); raw outputs "
                        "in OUT/roundN; profiles in round 1 only (default 1)")
    p.add_argument("--out", default=None,
                   help="folder for raw outputs (default /tmp/serve_gpu-<time>)")
    p.add_argument("--git-label", default=os.environ.get("SERVE_GPU_GIT"),
                   help="what to print as the tree's git state (default: `git` here, env "
                        "SERVE_GPU_GIT); on the device machine the copy's .git can be older "
                        "than its files, so pass --git-label \"$(git rev-parse --short HEAD) "
                        "...\" from the machine that sent the tree")
    p.add_argument("--report-from", default=None, metavar="DIR",
                   help="no run: print the report of an earlier run's --out folder again "
                        "(re-reading its results.json and py-spy files)")
    p.add_argument("--engine-worker", default=None, help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    if min(args.concurrency) < 1 or args.output_len < 2 or args.input_len < 1 \
            or args.rounds < 1:
        p.error("--concurrency >= 1, --output-len >= 2, --input-len >= 1 and --rounds >= 1")
    return args


# ---------------------------------------------------------------------------------------------
# engine alone (runs in a subprocess: `--engine-worker SPEC.json`)
def engine_worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, str(ROOT))
    from pdmesh.bench.metrics import RequestRecord, summarize
    from pdmesh.runtime.engine import Engine
    from pdmesh.runtime.sampling_params import SamplingParams

    t0 = time.perf_counter()
    engine = Engine(model=spec["model"], **spec["overrides"])
    ready_s = time.perf_counter() - t0
    print(f"engine ready in {ready_s:.1f} s: {engine.config}", flush=True)

    def closed_loop(prompts: list[str], conc: int, max_tokens: int) -> list:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        todo, live, recs = list(reversed(prompts)), {}, []

        def add() -> None:
            # the clock starts before add_request, which tokenizes the text: the mesh's
            # TTFT includes the gateway's tokenizing too (until 0e7f09b it started after)
            t = time.perf_counter()
            rid = engine.add_request(prompt=todo.pop(), params=params)
            live[rid] = [t, None, None, []]  # start, first, last, itl

        for _ in range(min(conc, len(todo))):
            add()
        last_progress = time.perf_counter()
        while live:
            outs = engine.step()
            now = time.perf_counter()
            if outs:
                last_progress = now
            elif now - last_progress > 120:
                raise RuntimeError(f"engine made no progress for 120 s with {len(live)} live")
            for o in outs:
                st = live.get(o.request_id)
                if st is None or not o.new_token_ids:
                    continue
                if st[1] is None:
                    st[1] = now
                else:
                    st[3].append(now - st[2])
                st[2] = now
                if o.finished:
                    del live[o.request_id]
                    recs.append(RequestRecord(True, "", len(o.prompt_token_ids), len(o.token_ids),
                                              st[1] - st[0], now - st[0], st[3], st[0]))
                    if todo:
                        add()
        return recs

    if spec["warmup"]:
        closed_loop(spec["warmup_prompts"], spec["warmup"], 16)
    from pdmesh.aio import freeze_startup_objects
    freeze_startup_objects()  # as every served process does once it is ready
    results = []
    for lv in spec["levels"]:
        before = dict(engine.steps)
        closed_loop(lv["prompts"][:1], 1, spec["output_len"])  # one request first, as loadgen
        t = time.perf_counter()
        recs = closed_loop(lv["prompts"], lv["c"], spec["output_len"])
        s = summarize(recs, time.perf_counter() - t, label="engine", concurrency=lv["c"])
        steps = {"engine": {k: v - before[k] for k, v in engine.steps.items()}}
        print(f"engine c={lv['c']} n={len(recs)}: {s.output_tok_s:.0f} out tok/s, "
              f"TTFT {1e3 * s.ttft.mean:.1f} ms, TPOT {1e3 * s.tpot.mean:.2f} ms; "
              f"{fmt_steps(steps)}", flush=True)
        results.append(summary_dict(s) | {"steps": steps})
    profile = None
    if spec.get("profile"):
        pr = spec["profile"]
        at = [r for r in results if r["concurrency"] == pr["c"]]
        if at:  # enough requests to outlast the window, sized from the measured level
            req_s = at[0]["completed"] / at[0]["duration_s"]
            need = max(2 * pr["c"], math.ceil(req_s * (pr["seconds"] + 3.0) * 1.3))
            pr["prompts"] = [pr["prompts"][i % len(pr["prompts"])] for i in range(need)]
        prof = Profiler({"engine": os.getpid()}, pr["seconds"], Path(pr["out"]), "engine")
        th = threading.Thread(target=prof.dump, daemon=True)
        timer = threading.Timer(pr["seconds"] / 2, th.start)
        timer.start()
        t = time.perf_counter()
        recs = closed_loop(pr["prompts"], pr["c"], spec["output_len"])
        log(f"engine profile load: {len(recs)} requests in {time.perf_counter() - t:.1f} s")
        profile = prof.finish()
        th.join(60)
    Path(spec["result"]).write_text(json.dumps({"ready_s": ready_s, "levels": results,
                                                "profile": profile}))
    return 0


def engine_overrides(args) -> dict:
    ov = {"device": args.device}
    if args.max_running_requests is not None:
        ov["max_running_requests"] = args.max_running_requests
    if args.kv_cache_bytes is not None:
        ov["kv_cache_bytes"] = args.kv_cache_bytes
    return ov


def run_engine_mode(args, workload, out: Path) -> dict:
    sizes = level_sizes(args)
    spec = {"model": args.model, "overrides": engine_overrides(args), "output_len": args.output_len,
            "warmup": args.warmup, "result": str(out / "engine-result.json"),
            "warmup_prompts": [r.prompt for r in workload.sample(args.warmup or 1,
                                                                seed=args.seed + 7919)],
            "levels": [{"c": c, "prompts": [r.prompt for r in workload.sample(n)]}
                       for c, n in sizes]}
    if not args.no_profile:
        c = args.profile_concurrency
        spec["profile"] = {"c": c, "seconds": args.profile_seconds, "out": str(out),
                           "prompts": [r.prompt for r in workload.sample(
                               max(2 * c, profile_number(args, None, c)), seed=args.seed + 1)]}
    (out / "engine-spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))
    with open(out / "engine.log", "w") as logf:
        proc = subprocess.Popen([sys.executable, __file__, "--engine-worker",
                                 str(out / "engine-spec.json")], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in proc.stdout:
            logf.write(line)
            print(f"  [engine] {line}", end="", flush=True)
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"engine subprocess exited {rc}; see {out / 'engine.log'}")
    return json.loads((out / "engine-result.json").read_text())


def report_again(folder: Path) -> int:
    data = json.loads((folder / "results.json").read_text())
    args = argparse.Namespace(**data["args"])
    for mode, r in data["results"].items():
        for name, p in (r.get("profile") or {}).items():
            raw = folder / f"pyspy-{mode}-{name}.txt"
            if raw.is_file():
                p.update(summarize_raw(raw.read_text()))
    print(report(args, data["results"], data["meta"], data.get("rounds")), end="")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.engine_worker:
        return engine_worker(args.engine_worker)
    if args.report_from:
        return report_again(Path(args.report_from))
    sys.path.insert(0, str(ROOT))
    if args.warmup is None:
        args.warmup = min(64, max(args.concurrency))
    out = Path(args.out or f"/tmp/serve_gpu-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": device_name(args.device),
            "git": args.git_label or git_state(), "command": " ".join(["python3", *sys.argv])}
    log(f"out: {out}; {meta}")
    if not args.no_profile and find_py_spy() is None:
        log("py-spy not found (PATH, PYTHONPATH/bin): profiles will show CPU use only")

    from pdmesh.bench.workload import Workload, WorkloadSpec
    workload = Workload.load(WorkloadSpec((args.input_len, args.input_len),
                                          (args.output_len, args.output_len), "default"
                                          if args.model == "default" else args.model,
                                          "sequential", args.seed))
    sample = workload.sample(8)
    meta["prompt_tokens"] = round(sum(r.prompt_tokens for r in sample) / len(sample))
    rounds: list[dict] = []
    for i in range(args.rounds):
        rout = out if args.rounds == 1 else out / f"round{i + 1}"
        rout.mkdir(exist_ok=True)
        rargs = args if i == 0 else argparse.Namespace(**{**vars(args), "no_profile": True})
        rounds.append({})
        for mode in args.modes:
            log(f"== {mode}" + (f", round {i + 1} of {args.rounds}" if args.rounds > 1 else ""))
            rounds[i][mode] = run_mode(rargs, mode, workload, rout)
            (out / "results.json").write_text(json.dumps(
                {"meta": meta, "args": vars(args), "results": rounds[0], "rounds": rounds},
                indent=1))
    res = rounds[0]
    text = report(args, res, meta, rounds)
    (out / "report.md").write_text(text)
    print(text, flush=True)
    # the tables once more, last: a caller that keeps only the output's tail (the device
    # tool keeps 12k characters) lost them behind the profiles once (2026-11-30)
    print(text.split("\n## Where the time goes")[0], flush=True)
    log(f"raw outputs in {out}")
    return 0 if all("error" not in r for res in rounds for r in res.values()) else 1


def run_mode(args, mode: str, workload, out: Path) -> dict:
    """One mode's levels (and profile); a failure is its "error", the other modes go on."""
    t = time.perf_counter()
    try:
        return (run_engine_mode(args, workload, out) if mode == "engine"
                else run_served_mode(args, mode, workload, out))
    except Exception as e:  # keep the other modes' numbers
        log(f"{mode} FAILED: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        log(f"{mode} took {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
