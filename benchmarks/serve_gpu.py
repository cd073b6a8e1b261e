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
import asyncio
import collections
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import serve_rounds  # benchmarks/, beside this script

ROOT = Path(__file__).resolve().parent.parent
MODES = ("engine", "colocated", "1p1d")
SERVE_ARGS = {"colocated": ["--prefill", "0", "--decode", "0", "--colocated", "1"],
              "1p1d": ["--prefill", "1", "--decode", "1"]}
TARGETS = {"ratio": 0.8, "ratio_at": (64, 256), "ttft_ms": 5.0, "tpot_rel": 0.10, "ready_s": 20.0}


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


def level_sizes(args) -> list[tuple[int, int]]:
    return [(c, max(args.min_requests, math.ceil(args.requests_factor * c)))
            for c in args.concurrency]


def log(msg: str) -> None:
    print(f"[serve_gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# profiling: py-spy (raw collapsed stacks) + /proc CPU time, on a set of processes
def find_py_spy() -> str | None:
    dirs = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    for d in [*dirs, str(Path(sys.executable).parent)]:
        for cand in (Path(d) / "bin" / "py-spy", Path(d) / "py-spy"):
            if d and cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    return shutil.which("py-spy")


def cpu_seconds(pid: int) -> float | None:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


class Profiler:
    """Start py-spy record on every (name, pid) at once; `finish()` -> {name: summary}."""

    def __init__(self, procs: dict[str, int], seconds: float, out: Path, tag: str) -> None:
        self.procs, self.seconds, self.out, self.tag = procs, seconds, out, tag
        self.spy = find_py_spy()
        self.t0 = time.perf_counter()
        self.cpu0 = {n: cpu_seconds(p) for n, p in procs.items()}
        self.runs: dict[str, subprocess.Popen] = {}
        if self.spy is None:
            log("py-spy not found: CPU use only")
            return
        for name, pid in procs.items():
            raw = out / f"pyspy-{tag}-{name}.txt"
            self.runs[name] = subprocess.Popen(
                [self.spy, "record", "-p", str(pid), "-d", str(int(math.ceil(seconds))),
                 "-r", "100", "--format", "raw", "--nonblocking", "--threads", "-o", str(raw)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.dump_at = self.t0 + seconds / 2

    def dump(self) -> None:
        """py-spy dump of each process once (mid-window), saved."""
        if self.spy is None:
            return
        with open(self.out / f"pyspy-{self.tag}-dumps.txt", "w") as f:
            for name, pid in self.procs.items():
                r = subprocess.run([self.spy, "dump", "-p", str(pid), "--nonblocking"],
                                   capture_output=True, text=True, timeout=60)
                f.write(f"===== {name} (pid {pid})\n{r.stdout}{r.stderr}\n")

    def finish(self) -> dict[str, dict]:
        left = self.seconds - (time.perf_counter() - self.t0)
        if left > 0:
            time.sleep(left)
        wall = time.perf_counter() - self.t0
        res = {}
        for name, pid in self.procs.items():
            c0, c1 = self.cpu0[name], cpu_seconds(pid)
            cpu = None if c0 is None or c1 is None else 100.0 * (c1 - c0) / wall
            res[name] = {"pid": pid, "cpu_pct": cpu, "top": [], "samples": 0, "threads": []}
        for name, proc in self.runs.items():
            try:
                msg = proc.communicate(timeout=self.seconds + 60)[0]
            except subprocess.TimeoutExpired:
                proc.kill()
                msg = proc.communicate()[0]
            raw = self.out / f"pyspy-{self.tag}-{name}.txt"
            if raw.is_file():
                res[name].update(summarize_raw(raw.read_text()))
            else:
                res[name]["error"] = msg.strip().splitlines()[-1:] or ["py-spy wrote nothing"]
        return res


_LINE = re.compile(r":\d+\)$")


def summarize_raw(text: str) -> dict:
    """Own-time (leaf) and per-thread sample counts from py-spy's raw (collapsed) output."""
    own, threads, total = collections.Counter(), collections.Counter(), 0
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        frames = stack.split(";")
        total += n
        if frames[0].startswith("thread ") or frames[0].startswith("process "):
            threads[frames[0]] += n
        leaf = frames[-1]
        if len(frames) == 1 and leaf.startswith(("thread ", "process ")):
            leaf = "(no Python frame: native code, e.g. grpc/epoll/CUDA)"
        m = re.match(r"(.*) \((.*)\)$", leaf)
        if m:
            fn, loc = m.group(1), _LINE.sub(")", "(" + m.group(2) + ")")[1:-1]
            loc = "/".join(Path(loc).parts[-2:])
            leaf = f"{fn} ({loc})"
        own[leaf] += n
    return {"samples": total, "top": own.most_common(),
            "threads": threads.most_common()}


def format_profile(name: str, p: dict, top: int) -> list[str]:
    cpu = "n/a" if p.get("cpu_pct") is None else f"{p['cpu_pct']:.0f}% CPU"
    out = [f"**{name}** (pid {p['pid']}, {cpu}, {p['samples']} py-spy samples of non-idle "
           f"threads)"]
    if p.get("error"):
        out.append(f"py-spy failed: {p['error']}")
        return out
    if not p["samples"]:
        return out
    if len(p["threads"]) > 1:
        out.append("threads: " + ", ".join(f"{t} {100 * n / p['samples']:.0f}%"
                                             for t, n in p["threads"][:6]))
    out += ["", "| own % | function (file) |", "|---:|---|"]
    out += [f"| {100 * n / p['samples']:.1f} | `{fn}` |" for fn, n in p["top"][:top]]
    return out + [""]


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


def fmt_steps(steps: dict[str, dict[str, int]]) -> str:
    """'steps: decode-1 1,210 decode / 0 prefill; ...' (a level's forward steps per engine)."""
    return "steps: " + "; ".join(f"{name} {s.get('decode', 0):,} decode / "
                                 f"{s.get('prefill', 0):,} prefill" for name, s in steps.items())


def worker_steps(urls: dict[str, str]) -> dict[str, dict[str, int]]:
    """{worker: {"prefill": n, "decode": n}}: its forward steps so far, from its /metrics."""
    from pdmesh.bench.scrape import fetch
    out = {}
    for name, url in urls.items():
        try:
            text = fetch(url)
        except OSError:
            continue
        out[name] = {k: int(float(m.group(1))) for k in ("prefill", "decode") if (m := re.search(
            rf"^pdmesh_worker_{k}_steps_total(?:{{[^}}]*}})? (\S+)$", text, re.M))}
    return out


def steps_delta(after: dict, before: dict) -> dict[str, dict[str, int]]:
    return {w: {k: v - before.get(w, {}).get(k, 0) for k, v in s.items()}
            for w, s in after.items()}


def summary_dict(s) -> dict:
    return {"concurrency": s.concurrency, "number": s.number, "completed": s.completed,
            "failed": s.failed, "duration_s": s.duration_s, "output_tok_s": s.output_tok_s,
            "ttft_mean": s.ttft.mean, "ttft_median": s.ttft.median, "ttft_p99": s.ttft.p99, "tpot_mean": s.tpot.mean,
            "tpot_p99": s.tpot.p99, "itl_mean": s.itl.mean, "errors": list(s.errors)}


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


def profile_number(args, req_s: float | None, c: int) -> int:
    """Requests for a load that outlasts the profile window (+ a 1 s lead and slack)."""
    if not req_s:
        return 8 * c
    return max(2 * c, math.ceil(req_s * (args.profile_seconds + 3.0) * 1.3))


# ---------------------------------------------------------------------------------------------
# served modes
def spawn_order(name: str) -> float:
    """serve spawns the registry, then workers by their index (prefill-0, decode-1, ...),
    then the gateway."""
    if name == "registry":
        return -1.0
    tail = name.rsplit("-", 1)[-1]
    return float(tail) if tail.isdigit() else math.inf


class Serve:
    """`pdmesh serve ...` with its output timestamped, logged and scanned for readiness."""

    def __init__(self, mode: str, args, out: Path) -> None:
        argv = [sys.executable, "-m", "pdmesh.cli", "serve", "--model", args.model, "--port", "0",
                "--grpc-port", "0", "--ready-timeout", str(args.ready_timeout), *SERVE_ARGS[mode]]
        wargs = list(args.worker_arg)
        if args.max_running_requests is not None:
            wargs.append(f"--max-running-requests={args.max_running_requests}")
        if args.kv_cache_bytes is not None:
            wargs.append(f"--kv-cache-bytes={args.kv_cache_bytes}")
        argv += [f"--worker-arg={a}" for a in wargs]
        argv += [f"--gateway-arg={a}" for a in args.gateway_arg] + list(args.serve_arg)
        env = dict(os.environ, PDMESH_DEVICE=args.device, PYTHONUNBUFFERED="1")
        self.mode, self.lines, self.listening = mode, [], []  # (t, name)
        self.worker_ready: dict[str, float] = {}  # name -> its own start, from its line
        self.metrics_urls: dict[str, str] = {}  # name -> its /metrics, from serve's line
        self.ready_t: float | None = None
        self.url: str | None = None
        self.ready = threading.Event()
        self.logf = open(out / f"serve-{mode}.log", "w")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            t = time.perf_counter() - self.t0
            self.logf.write(f"{t:8.3f} {line}")
            self.logf.flush()
            if m := re.match(r"\[([\w-]+)\] .*listening on", line):
                self.listening.append((t, m.group(1)))
            if m := re.match(r"\[([\w-]+)\] \w+ ready ([\d.]+) s after the process", line):
                self.worker_ready[m.group(1)] = float(m.group(2))
            if m := re.search(r"pdmesh serve: metrics — (.*)", line):
                self.metrics_urls = dict(re.findall(r"([\w-]+) (http://\S+?/metrics)", m.group(1)))
            if m := re.search(r"pdmesh serve: ready — .*gateway (\S+)", line):
                self.url, self.ready_t = f"http://{m.group(1).rstrip(',')}/v1", t
                self.ready.set()
            if not self.ready.is_set() or re.search(r"error|Error|Traceback|exited", line):
                print(f"  [{self.mode} {t:6.1f}s] {line}", end="", flush=True)
        self.ready.set()

    def worker_metrics(self) -> dict[str, str]:
        """{worker name: its /metrics URL}, from serve's metrics line."""
        return {k: v for k, v in self.metrics_urls.items() if k not in ("registry", "gateway")}

    def wait_ready(self, timeout: float) -> str:
        if not self.ready.wait(timeout) or self.url is None:
            raise RuntimeError(f"pdmesh serve ({self.mode}) did not become ready "
                               f"(exit {self.proc.poll()}); see serve-{self.mode}.log")
        return self.url

    def ready_times(self) -> list[dict]:
        """[{name, listening_s, took_s}] per child, in the order they listened. Workers
        start together: each one's own `ready N s after the process started`; the
        registry and the gateway (one line per process): since the line before."""
        rows, prev = [], 0.0
        for t, name in self.listening:
            own = self.worker_ready.get(name)
            rows.append({"name": name, "listening_s": t,
                         "took_s": own if own is not None else t - prev})
            prev = t
        return rows

    def children(self) -> dict[str, int]:
        """{name: pid} of serve's children, named as serve names them (registry, prefill-0,
        decode-1, colocated-2, gateway) and spawned in that order (the workers together,
        so they may listen in another)."""
        import psutil
        kids = []
        for ch in psutil.Process(self.proc.pid).children(recursive=False):
            try:
                if "pdmesh.cli" in ch.cmdline():
                    kids.append((ch.create_time(), ch.pid))
            except psutil.Error:
                continue
        # a gateway of N processes prints N listening lines; serve has one gateway child
        names = sorted(dict.fromkeys(name for _, name in self.listening), key=spawn_order)
        kids.sort()
        if len(names) != len(kids):
            names = [f"child-{i}" for i in range(len(kids))]
        found = {name: pid for name, (_, pid) in zip(names, kids)}
        for name, pid in list(found.items()):  # engine cores, gateway processes
            try:
                for i, ch in enumerate(psutil.Process(pid).children(recursive=False)):
                    if "pdmesh.worker.core_process" in ch.cmdline():
                        found[f"{name}-core"] = ch.pid
                    elif "pdmesh.cli" in ch.cmdline():  # pdmesh gateway --processes N
                        found[f"{name}-{i}"] = ch.pid
            except psutil.Error:
                continue
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.logf.close()


async def served_levels(args, mode: str, url: str, workload,
                        workers: Callable[[], dict[str, str]]) -> tuple[list[dict], object]:
    """Each level through the gateway at `url`; `workers()`: name -> /metrics, for steps
    (serve prints its metrics line just after its ready line)."""
    from pdmesh.bench.loadgen import ClientConfig, resolve_model, run_fixed, warmup
    from pdmesh.bench.scrape import mean_parts_ms

    # the gateway lists (and routes to) workers once its registry watch has seen them,
    # which can be a moment after `pdmesh serve: ready`
    deadline, t0 = time.perf_counter() + 120, time.perf_counter()
    while True:
        try:
            cfg = await resolve_model(ClientConfig(url, timeout_s=args.timeout, ignore_eos=True))
            break
        except Exception as e:  # aiohttp errors, "listed no models"
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the gateway lists no model after 120 s: {e}") from e
            await asyncio.sleep(0.2)
    log(f"{mode}: model {cfg.model!r} listed after {time.perf_counter() - t0:.1f} s")
    if args.warmup:
        await warmup(cfg, workload, args.warmup)
    results = []
    for c, n in level_sizes(args):
        before = await asyncio.to_thread(gateway_metrics, url)
        steps0 = await asyncio.to_thread(worker_steps, workers())
        s, recs = await run_fixed(cfg, workload, c, n, label=mode, warmup_requests=1,
                                  progress=False)
        parts = mean_parts_ms(await asyncio.to_thread(gateway_metrics, url), before)
        steps = steps_delta(await asyncio.to_thread(worker_steps, workers()), steps0)
        # in send order: a slow first request (a new connection's gateway process) and a
        # slow one later (the workers) look alike in a mean
        ttfts = [round(1e3 * r.ttft, 1) if r.ok else None for r in recs]
        log(f"{mode} c={c} n={n}: {s.completed} ok, {s.failed} failed, {s.output_tok_s:.0f} out "
            f"tok/s, TTFT {1e3 * s.ttft.mean:.1f} ms (median {1e3 * s.ttft.median:.1f}, P99 "
            f"{1e3 * s.ttft.p99:.1f}), TPOT {1e3 * s.tpot.mean:.2f} ms"
            + (f" ({s.errors[0]})" if s.errors else "")
            + ("; TTFT parts " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()) + " ms"
               if parts else "") + f"; {fmt_steps(steps)}")
        if c == 1:
            log(f"{mode} c=1 TTFTs in order, ms: {ttfts}")
        results.append(summary_dict(s) | {"ttft_parts_ms": parts, "ttfts_ms": ttfts,
                                          "steps": steps})
    return results, cfg


def gateway_metrics(url: str) -> str:
    """The gateway's /metrics text ("" when it has none); `url` is its .../v1."""
    from pdmesh.bench.scrape import fetch
    try:
        return fetch(url[:-len("/v1")] + "/metrics")
    except OSError:
        return ""


async def served_profile(args, serve: Serve, cfg, workload, req_s: float | None,
                         out: Path) -> dict:
    from pdmesh.bench.loadgen import run_fixed

    c = args.profile_concurrency
    n = profile_number(args, req_s, c)
    procs = {k: v for k, v in serve.children().items() if k != "registry"}
    procs["client"] = os.getpid()
    log(f"{serve.mode} profile: c={c}, {n} requests, py-spy on {procs}")
    load = asyncio.create_task(run_fixed(cfg, workload, c, n, label=f"{serve.mode}-profile",
                                         progress=False))
    await asyncio.sleep(1.0)  # let the load ramp up
    prof = await asyncio.to_thread(Profiler, procs, args.profile_seconds, out, serve.mode)
    dump = asyncio.create_task(asyncio.sleep(args.profile_seconds / 2))
    await dump
    await asyncio.to_thread(prof.dump)
    res = await asyncio.to_thread(prof.finish)
    s, _ = await load
    log(f"{serve.mode} profile load: {s.completed} ok in {s.duration_s:.1f} s, "
        f"{s.output_tok_s:.0f} out tok/s")
    return res


def ttft_parts(url: str, save: Path) -> dict[str, float]:
    """Mean ms of each pdmesh_gateway_ttft_part_seconds part (PD requests only: prefill
    queue / compute, KV transfer, first decode) from the gateway's /metrics, saved raw."""
    from pdmesh.bench.scrape import fetch, mean_parts_ms
    try:
        text = fetch(url[:-len("/v1")] + "/metrics")
    except OSError as e:
        log(f"no /metrics from the gateway: {e}")
        return {}
    save.write_text(text)
    return mean_parts_ms(text)


def run_served_mode(args, mode: str, workload, out: Path) -> dict:
    serve = Serve(mode, args, out)
    try:
        url = serve.wait_ready(args.ready_timeout + 30)
        log(f"{mode}: ready in {serve.ready_t:.1f} s at {url}")

        async def go():
            levels, cfg = await served_levels(args, mode, url, workload, serve.worker_metrics)
            prof = None
            if not args.no_profile:
                at = [r for r in levels if r["concurrency"] == args.profile_concurrency]
                req_s = (at[0]["completed"] / at[0]["duration_s"]) if at else None
                prof = await served_profile(args, serve, cfg, workload, req_s, out)
            return levels, prof
        levels, prof = asyncio.run(go())
        parts = ttft_parts(url, out / f"metrics-{mode}.txt")
        if parts:
            log(f"{mode}: mean TTFT parts, all levels: " +
                ", ".join(f"{k} {v:.2f} ms" for k, v in parts.items()))
        return {"ready_s": serve.ready_t, "services": serve.ready_times(), "levels": levels,
                "profile": prof, "ttft_parts_ms": parts}
    finally:
        serve.stop()


# ---------------------------------------------------------------------------------------------
# report
def steps_section(args, res: dict, modes: list[str]) -> list[str]:
    """Each level's forward steps per engine (incl. the one request before the level):
    prompts arriving one by one cost more prefill steps between decode steps."""
    L = []
    for c, _ in level_sizes(args):
        cells = []
        for m in modes:
            r = next((x for x in res[m]["levels"] if x["concurrency"] == c), None)
            if r and r.get("steps"):
                cells.append(f"{m}: {fmt_steps(r['steps'])[len('steps: '):]}")
        if cells:
            L.append(f"- c={c}: " + "; ".join(cells))
    return ["", "## Forward steps per level (decode / prefill)", ""] + L if L else []


def fmt_ms(x: float) -> str:
    return f"{1e3 * x:.1f}"


def report(args, res: dict, meta: dict, rounds: list[dict] | None = None) -> str:
    """The run's report: `res` (round 1's results) in full; with several `rounds`, each
    level's ratios over the rounds and the targets judged on their medians, first."""
    L = ["# serve_gpu: engine alone vs `pdmesh serve` colocated vs 1P1D", "",
         f"- date: {meta['date']}", f"- device: {meta['device']}",
         f"- git: {meta['git']}", f"- command: `{meta['command']}`",
         f"- workload: {args.input_len} random token ids -> text "
         f"(~{meta.get('prompt_tokens', '?')} tokens re-encoded), {args.output_len} output "
         f"tokens, ignore_eos, greedy, "
         f"N = max({args.min_requests}, {args.requests_factor:g} x C) per level, model "
         f"{args.model}, device {args.device}", ""]
    if rounds and len(rounds) > 1:
        L += serve_rounds.section(rounds, args.modes, [c for c, _ in level_sizes(args)],
                                  TARGETS) + ["", "Round 1 in full:", ""]
    modes = [m for m in args.modes if m in res and "levels" in res[m]]
    eng = {r["concurrency"]: r for r in res.get("engine", {}).get("levels", [])}
    hdr = "| C |" + "".join(f" {m} tok/s | {m} TTFT ms | {m} TPOT ms |" for m in modes) + \
        "".join(f" {m}/engine |" for m in modes if m != "engine")
    L += ["## Throughput and latency (means)", "", hdr,
          "|" + "---:|" * (1 + 3 * len(modes) + len([m for m in modes if m != "engine"]))]
    for c, _ in level_sizes(args):
        row = f"| {c} |"
        for m in modes:
            r = next((x for x in res[m]["levels"] if x["concurrency"] == c), None)
            bad = "" if r is None or not r["failed"] else f" ({r['failed']} failed)"
            row += " - | - | - |" if r is None else (
                f" {r['output_tok_s']:.0f}{bad} | {fmt_ms(r['ttft_mean'])} | "
                f"{fmt_ms(r['tpot_mean'])} |")
        for m in modes:
            if m == "engine":
                continue
            r = next((x for x in res[m]["levels"] if x["concurrency"] == c), None)
            e = eng.get(c)
            row += (f" {r['output_tok_s'] / e['output_tok_s']:.2f}x |"
                    if r and e and e["output_tok_s"] else " - |")
        L.append(row)
    L += steps_section(args, res, modes)
    L += ["", "## Targets", ""]
    for m in modes:
        if m == "engine" or not eng:
            continue
        lv = {r["concurrency"]: r for r in res[m]["levels"]}
        for c in TARGETS["ratio_at"]:
            if c in lv and c in eng:
                q = lv[c]["output_tok_s"] / eng[c]["output_tok_s"]
                L.append(f"- {m} c={c}: {q:.2f}x engine (target >= {TARGETS['ratio']}): "
                         f"{'MET' if q >= TARGETS['ratio'] else 'MISSED'}")
        if 1 in lv and 1 in eng:
            dt = 1e3 * (lv[1]["ttft_mean"] - eng[1]["ttft_mean"])
            rel = lv[1]["tpot_mean"] / eng[1]["tpot_mean"] - 1
            L.append(f"- {m} c=1: TTFT {dt:+.1f} ms vs engine (target <= +{TARGETS['ttft_ms']:g} "
                     f"ms): {'MET' if dt <= TARGETS['ttft_ms'] else 'MISSED'}; "
                     f"TPOT {100 * rel:+.1f}% (target <= +{100 * TARGETS['tpot_rel']:.0f}%): "
                     f"{'MET' if rel <= TARGETS['tpot_rel'] else 'MISSED'}")
    L += ["", "## Ready times (s)", ""]
    if "engine" in res and "ready_s" in res["engine"]:
        L.append(f"- engine alone: Engine(...) constructed in {res['engine']['ready_s']:.1f} s "
                 "(in a process that has imported torch)")
    for m in modes:
        if m == "engine":
            continue
        svc = res[m].get("services", [])
        L.append(f"- {m}: `pdmesh serve: ready` at {res[m]['ready_s']:.1f} s after spawn; "
                 + ", ".join(f"{s['name']} {s['took_s']:.1f}" for s in svc))
        for s in svc:
            if s["name"] not in ("registry", "gateway"):
                ok = s["took_s"] <= TARGETS["ready_s"]
                L.append(f"  - {s['name']}: {s['took_s']:.1f} s (target <= "
                         f"{TARGETS['ready_s']:g} s): {'MET' if ok else 'MISSED'}")
    profs = [(m, res[m].get("profile")) for m in args.modes if res.get(m, {}).get("profile")]
    if profs:
        L += ["", f"## Where the time goes at c={args.profile_concurrency} "
              f"(py-spy, {args.profile_seconds:g} s, own samples of non-idle threads)", "",
              "own % = the function's share of the process's non-idle py-spy samples (leaf "
              "frame; a C extension's time counts to the Python function that called it); "
              "CPU % = the process's CPU time over the window / wall time (100% = one core). "
              "Own time at a GPU sync point (`sample`, `Event.synchronize`, "
              "`CUDAGraph.replay`, `.tolist()`) includes waiting for the GPU.", ""]
        for m, prof in profs:
            L += [f"### {m}", ""]
            for name, p in prof.items():
                L += format_profile(name, p, args.profile_top)
    errs = {m: res[m]["error"] for m in args.modes if res.get(m, {}).get("error")}
    if errs:
        L += ["", "## Failures", ""] + [f"- {m}: {e}" for m, e in errs.items()]
    return "\n".join(L) + "\n"


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--short", "--untracked-files=no"], cwd=ROOT,
                               text=True, capture_output=True).stdout.split()
        files = dirty[1::2]
        return head + (f" + uncommitted changes in {', '.join(files)}" if files else "") \
            if head else "unknown (no git here)"
    except OSError:
        return "unknown (no git here)"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
            return r.stdout.strip().replace("\n", "; ") or device
        except OSError:
            return device
    return f"cpu ({os.cpu_count()} cores)"


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
