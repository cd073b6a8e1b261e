"""Per-request disaggregation on a mixed workload: always-PD vs always-local (prefill on
the decode worker) vs auto, side by side on one 1P1D mesh.

One `pdmesh serve --prefill 1 --decode 1 --pd-mode auto` plus two more gateways on its
registry (`pdmesh gateway --pd-mode always`, `--pd-mode never`): the three policies share
the same workers, so only the routing differs. The workers run without their prefix
cache (--no-prefix-cache): every policy gets the same prompts, which must not find the
previous policy's KV cached. Each round sends the same mixed request
list (short and long prompts drawn like `pdmesh bench`'s random-ids, Poisson arrivals) to
each gateway in turn, rotating the order every round, each run holding the CPU lock
(--lock) that the other CPU benchmarks take. Reports per policy over all rounds: goodput
(requests meeting both SLOs per second), SLO attainment, mean / P99 TTFT (all, short,
long), mean TPOT, the share prefilled locally, and the gateway's predicted vs measured
TTFT per choice (its pdmesh_gateway_pd_mode_ttft_seconds histograms).

    .venv/bin/python benchmarks/pd_mode_bench.py --rounds 3 --number 48 --rate 1.0
"""
from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pdmesh.bench.loadgen import ClientConfig, send_request  # noqa: E402
from pdmesh.bench.metrics import meets_slo, summarize  # noqa: E402
from pdmesh.bench.workload import Workload, WorkloadSpec, load_tokenizer  # noqa: E402

POLICIES = ("always", "never", "auto")
TOKEN = "pdmesh-pd-mode-bench"


def spawn(argv: list[str], pattern: str) -> tuple[subprocess.Popen, re.Match, list[str]]:
    """Start `pdmesh <argv>` and wait for a line matching `pattern`."""
    env = dict(os.environ, PDMESH_CLUSTER_TOKEN=TOKEN)
    proc = subprocess.Popen([sys.executable, "-m", "pdmesh.cli", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if m := re.search(pattern, line):
            threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
            return proc, m, lines
    raise RuntimeError(f"pdmesh {argv[0]} did not start:\n" + "".join(lines[-30:]))


def start_mesh(serve_args: list[str]) -> tuple[list[subprocess.Popen], dict[str, str]]:
    """serve (auto) + one gateway per other policy; policy -> REST base URL."""
    serve, m, lines = spawn(["serve", "--port", "0", "--grpc-port", "0", "--prefill", "1",
                             "--decode", "1", "--pd-mode", "auto",
                             "--worker-arg=--no-prefix-cache", *serve_args],
                            r"ready — .*gateway (\S+)")
    procs, bases = [serve], {"auto": f"http://{m.group(1).rstrip(',')}"}
    registry = re.search(r"registry (\S+?),", "".join(lines)).group(1)
    for policy in ("always", "never"):
        gw, gm, _ = spawn(["gateway", "--registry", registry, "--port", "0", "--grpc-port",
                           "0", "--pd-mode", policy], r"listening on (\S+) \(REST\)")
        procs.append(gw)
        bases[policy] = f"http://{gm.group(1)}"
    return procs, bases


def mixed_requests(tok, args, seed: int) -> list:
    """`number` requests, each long with probability long_fraction (fixed per seed)."""
    rng = np.random.RandomState(seed)
    is_long = rng.random_sample(args.number) < args.long_fraction
    out_len = (args.output_len, args.output_len)
    short = Workload(WorkloadSpec(tuple(args.short), out_len, seed=seed), tok)
    long_ = Workload(WorkloadSpec(tuple(args.long), out_len, seed=seed + 1), tok)
    s, lg = iter(short.sample(args.number)), iter(long_.sample(args.number))
    return [next(lg) if x else next(s) for x in is_long]


async def run_once(base: str, reqs: list, rate: float, seed: int) -> list:
    """Send `reqs` with Poisson gaps at `rate` req/s; their records in order."""
    import aiohttp

    cfg = ClientConfig(base + "/v1", model="default", backend="completions")
    gaps = np.random.RandomState(seed).exponential(1.0 / rate, size=len(reqs))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        tasks = []
        for r, gap in zip(reqs, gaps):
            tasks.append(asyncio.create_task(send_request(session, cfg, r)))
            await asyncio.sleep(float(gap))
        return list(await asyncio.gather(*tasks))


def scrape(base: str) -> dict[tuple[str, ...], float]:
    """pd_mode samples of the gateway's /metrics: (name, labels...) -> value."""
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"(pdmesh_gateway_(?:pd_mode_\w+?|ttft_part_seconds)(?:_sum|_count|_total))"
                     r"\{(.*)\} (\S+)", line)
        if m:
            labels = tuple(v for _, v in re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out[(m.group(1), *labels)] = float(m.group(3))
    return out


def cpu_seconds(procs: list[subprocess.Popen]) -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, of this benchmark: itself, the mesh and
    the gateways with their children), so a run can say how much others took."""
    mine = 0.0
    roots = [psutil.Process(), *(psutil.Process(p.pid) for p in procs)]
    for proc in [r for root in roots for r in (root, *root.children(recursive=True))]:
        try:
            t = proc.cpu_times()
            mine += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    t = psutil.cpu_times()
    return t.user + t.system + t.nice + t.irq + t.softirq, mine


def coefficients(base: str) -> str:
    """The gateway's calibrated cost model (pdmesh_gateway_pd_mode_model), one line."""
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    found = re.findall(r'pdmesh_gateway_pd_mode_model\{coefficient="(\w+)"\} (\S+)', text)
    return ", ".join(f"{k} {float(v):.4g}" for k, v in found)


def delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def report(args, records: dict, scraped: dict, durations: dict) -> str:
    """The markdown table of every policy over all rounds."""
    cut = (args.short[1] + args.long[0]) / 2
    rows = ["| policy | goodput req/s | SLO met | mean TTFT s | P99 TTFT s | mean TTFT "
            "short / long s | mean TPOT s | local prefills | predicted / measured TTFT "
            "s (remote; local) |", "|---|---|---|---|---|---|---|---|---|"]
    for policy in args.policies:
        recs, d = records[policy], scraped[policy]
        s = summarize(recs, durations[policy], slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot)
        ttft = {k: np.mean([r.ttft for r in recs if r.ok and (r.prompt_tokens > cut) == k])
                for k in (False, True)}
        n = {m: d.get(("pdmesh_gateway_pd_mode_requests_total", m), 0.0)
             for m in ("remote", "local")}
        pm = []
        for m in ("remote", "local"):
            c = d.get(("pdmesh_gateway_pd_mode_ttft_seconds_count", m, "measured"), 0.0)
            pm.append("–" if not c else "{:.2f} / {:.2f}".format(*(
                d[("pdmesh_gateway_pd_mode_ttft_seconds_sum", m, src)] / c
                for src in ("predicted", "measured"))))
        rows.append(
            f"| {policy} | {s.goodput_req_s:.3f} | {s.slo_attainment:.0%} | {s.ttft.mean:.2f} "
            f"| {s.ttft.p99:.2f} | {ttft[False]:.2f} / {ttft[True]:.2f} | {s.tpot.mean:.3f} | "
            f"{n['local'] / max(1.0, sum(n.values())):.0%} | {pm[0]}; {pm[1]} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--number", type=int, default=48, help="requests per run")
    p.add_argument("--rate", type=float, default=1.0, help="Poisson arrivals, req/s")
    p.add_argument("--short", type=int, nargs=2, default=[16, 64], metavar=("LO", "HI"))
    p.add_argument("--long", type=int, nargs=2, default=[768, 1024], metavar=("LO", "HI"))
    p.add_argument("--long-fraction", type=float, default=0.25)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--slo-ttft", type=float, default=2.0)
    p.add_argument("--slo-tpot", type=float, default=0.1)
    p.add_argument("--slo-grid", nargs="*", default=["2:0.1", "3:0.15", "5:0.1"],
                   metavar="TTFT:TPOT", help="also print goodput under these SLO pairs "
                   "(same records)")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--lock", default="/tmp/pdmesh-cpu.lock",
                   help="held exclusively around each run (other benchmarks take it too)")
    p.add_argument("--json", default=None, help="write every record here")
    p.add_argument("--serve-arg", action="append", default=[], help="extra serve flag")
    args = p.parse_args()
    tok = load_tokenizer("default")
    procs, bases = start_mesh(args.serve_arg)
    records = {k: [] for k in args.policies}
    durations = {k: 0.0 for k in args.policies}
    scraped = {k: {} for k in args.policies}
    rounds = {k: [] for k in args.policies}  # (goodput req/s, other processes' cores)
    try:
        for policy in args.policies:  # warm-up: both paths, both lengths
            asyncio.run(run_once(bases[policy], mixed_requests(tok, args, 99)[:4], 4.0, 99))
        for r in range(args.rounds):
            reqs = mixed_requests(tok, args, 1000 + r)
            k = r % len(args.policies)
            for policy in args.policies[k:] + args.policies[:k]:
                with open(args.lock, "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    before, t0 = scrape(bases[policy]), time.perf_counter()
                    cpu0 = cpu_seconds(procs)
                    recs = asyncio.run(run_once(bases[policy], reqs, args.rate, 2000 + r))
                    wall = time.perf_counter() - t0
                    cpu1 = cpu_seconds(procs)
                    durations[policy] += wall
                    d = delta(scrape(bases[policy]), before)
                others = ((cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])) / wall
                for key, v in d.items():
                    scraped[policy][key] = scraped[policy].get(key, 0.0) + v
                records[policy] += recs
                good = sum(meets_slo(x, args.slo_ttft, args.slo_tpot) for x in recs)
                rounds[policy].append((good / wall, others))
                print(f"round {r + 1} {policy}: {good}/{len(recs)} met the SLOs, "
                      f"{sum(not x.ok for x in recs)} failed, {wall:.0f} s, other processes "
                      f"used {others:.2f} cores", file=sys.stderr, flush=True)
        coefs = {k: coefficients(bases[k]) for k in args.policies}
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    print(f"rounds {args.rounds} x {args.number} requests at {args.rate:g} req/s; prompts "
          f"{args.short[0]}-{args.short[1]} tokens ({1 - args.long_fraction:.0%}) or "
          f"{args.long[0]}-{args.long[1]} ({args.long_fraction:.0%}), output "
          f"{args.output_len}; SLO TTFT <= {args.slo_ttft:g} s and TPOT <= {args.slo_tpot:g} s\n")
    print(report(args, records, scraped, durations))
    print("\ngoodput req/s under other SLOs (TTFT s / TPOT s), same records: " + "; ".join(
        f"{t}/{tp}: " + ", ".join(
            f"{k} {sum(meets_slo(x, float(t), float(tp)) for x in records[k]) / durations[k]:.3f}"
            for k in args.policies)
        for t, tp in (g.split(":") for g in args.slo_grid)))
    print("\nTTFT parts of remote requests, mean s (queue / prefill / transfer / first "
          "decode): " + "; ".join(f"{k} " + " / ".join(
              "{:.3f}".format(scraped[k].get(("pdmesh_gateway_ttft_part_seconds_sum", part), 0)
                              / max(1, scraped[k].get(("pdmesh_gateway_ttft_part_seconds_count",
                                                        part), 0)))
              for part in ("queue", "prefill", "transfer", "first_decode"))
          for k in args.policies))
    print("\ncalibrated cost model at the end: " + "; ".join(
        f"{k}: {v}" for k, v in coefs.items()))
    print("\ngoodput req/s per round (other processes' CPU, cores): " + "; ".join(
        f"{k} " + ", ".join(f"{g:.3f} ({o:.2f})" for g, o in v) for k, v in rounds.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({k: [r.__dict__ for r in v]
                                               for k, v in records.items()}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
