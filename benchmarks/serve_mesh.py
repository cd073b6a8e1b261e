"""serve_gpu.py's served modes: `pdmesh serve` started and scanned for readiness, its
levels driven through the gateway (pdmesh bench's load generator), the TTFT parts and
each worker's forward steps from /metrics, and its profile."""
from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from serve_common import (ROOT, SERVE_ARGS, fmt_steps, level_sizes, log, profile_number,
                          summary_dict)
from serve_profile import Profiler

def worker_steps(urls: dict[str, str]) -> dict[str, dict[str, int]]:
    """{worker: {"prefill": n, "decode": n}}: its forward steps so far, from its /metrics."""
    from pdmesh.bench.scrape import fetch, forward_steps
    out = {}
    for name, url in urls.items():
        try:
            out[name] = forward_steps(fetch(url))
        except OSError:
            continue
    return out


def steps_delta(after: dict, before: dict) -> dict[str, dict[str, int]]:
    return {w: {k: v - before.get(w, {}).get(k, 0) for k, v in s.items()}
            for w, s in after.items()}


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
