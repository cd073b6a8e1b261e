"""The gateway's ceiling: streamed tok/s and added latency per token, pdmesh vs SMG.

    .venv/bin/python benchmarks/gateway_ceiling.py [--before WORKTREE] [--smg CMD]
        [--streams 256] [--max-tokens 128] [--seconds 20] [--pace-ms 50]
        [--client-procs K] [--fakes M] [--gateway-arg=--processes=N] [--out FILE.md]

Behind each gateway sit `--fakes M` fake workers that stream tokens as fast as their
process can (benchmarks/gateway_fakes_bench.py): for pdmesh M grpc.aio processes, each
serving Decode and Prefill and registered with a real registry (M decode + M prefill
workers, each on its own port; the gateway routes across them, round robin), in front of
the real `pdmesh gateway`; for SMG M tiny aiohttp OpenAI servers behind
`smg launch --worker-urls URL1 ... URLM --policy round_robin`. `--smg` is the command
that runs SMG's CLI, shlex-split, e.g. `/venv/bin/smg`, `"python3 -m smg"` or
`"env PYTHONPATH=/opt/smg python3 -c 'from smg.cli import main; main()'"` (set
PYTHONPATH inside the command, not for this script, whose processes use this venv); the
row is left out when its program is not found. `--before DIR` adds the pdmesh gateway of
another checkout (a `git worktree` of an older commit), run the same way from that
folder. `--gateway-arg=X` passes X to this checkout's gateway (e.g. `--processes=6`).
Results: benchmarks/results/2026-11-29-gateway-ceiling-cpu.md.

Per gateway, two phases of `--streams` concurrent streaming chat requests (each stream
sends request after request until `--seconds` have passed), the streams split over
`--client-procs K` client processes (benchmarks/ceiling_client.py, started together;
tokens summed over them, tok/s over the first start to the last end):
  ceiling  the fakes stream as fast as they can: client tok/s and the gateway's CPU time
           per streamed token (utime + stime of the gateway process and all its
           descendants, /proc: every process of `pdmesh gateway --processes N`, SMG's
           threads). Also the cores each side used (CPU seconds / wall seconds), in all
           and for its busiest process: gateway, clients (their own utime + stime) and
           fakes, so a side whose busiest process sits near 1.0 core is the limit (a
           Python client or fake process is one event-loop thread);
  paced    the fakes send one token per `--pace-ms` per stream: added latency per token
           (the client's receive time minus the fake's send time, matched by response id
           across every client's records and every fake's send log; one monotonic clock)
           and the client's inter-token gap, p50 / p99.
On a many-core host give the clients and fakes enough processes that they are not the
limit, e.g. 16 cores: `--client-procs 6 --fakes 4 --gateway-arg=--processes=6`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ceiling_client as cc  # noqa: E402

HERE = Path(__file__).resolve().parent
FAKES = str(HERE / "gateway_fakes_bench.py")
CLIENT = str(HERE / "ceiling_client.py")
WORDS = ("the of and to in is was for on with as by at from his that it he are this be "
         "or an had not but which one have were they you all she there been their has "
         "her when who more no if out so said what up its about into than them can only "
         "other new some time could these two may then do first any my now such like").split()


def spawn(cmd: list[str], pattern: str, env: dict | None = None, timeout: float = 120,
          cwd: str | None = None):
    """Start `cmd`; return (process, match) once a line of its output matches."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=cwd,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                                 **(env or {})}, start_new_session=True)
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if m := re.search(pattern, line):
            import threading
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, m
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not start (exit {proc.poll()})")


def cpu_tree(pid: int) -> dict[int, float]:
    """utime + stime of `pid` and of each of its descendants, by pid, from /proc (clock
    ticks; a process's own threads included, its exited children's not)."""
    tick, out, todo = os.sysconf("SC_CLK_TCK"), {}, [pid]
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(d))
            except OSError:
                continue
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[p] = (int(fields[11]) + int(fields[12])) / tick
        todo += children.get(p, [])
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> tuple[float, float]:
    """(CPU seconds of all processes, of the busiest one) between two cpu_tree()s."""
    d = [t - before.get(p, 0.0) for p, t in after.items()] or [0.0]
    return sum(d), max(d)


def word_ids() -> tuple[list[int], list[str]]:
    """Token ids that each decode to one ' word' (so the client counts tokens by spaces)."""
    from pdmesh.runtime.loader import resolve_model_path
    from pdmesh.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_path(resolve_model_path("default"))
    ids, words = [], []
    for w in WORDS:
        e = tok.encode(" " + w, add_special_tokens=False)
        if len(e) == 1 and tok.decode(e) == " " + w:
            ids.append(e[0]), words.append(" " + w)
    return ids, words


class Stack:
    """The processes of one target; `url` is its OpenAI base, `gateway` the process measured
    (with its descendants), `fakes` the fake workers and `logs` their send logs."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.url, self.gateway = "", None
        self.fakes: list[subprocess.Popen] = []
        self.logs: list[str] = []

    def add(self, proc):
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def pdmesh_stack(s: Stack, tmp: Path, name: str, ids: list[int], src: str | None,
                 fakes: int, extra: list[str] = ()) -> None:
    py = sys.executable
    env = {"PYTHONPATH": src} if src else {}
    reg, m = spawn([py, "-m", "pdmesh.cli", "registry", "--host", "127.0.0.1", "--port", "0",
                    "--heartbeat-interval", "1"], r"listening on (\S+)")
    s.add(reg)
    registry = m.group(1)
    # each fake registers a prefill and a decode worker on ports of its own before it
    # prints; the gateway starts after all, so its first registry snapshot has them all
    for j in range(fakes):
        s.logs.append(str(tmp / f"{name}.sends.{j}"))
        s.fakes.append(s.add(spawn([py, FAKES, "grpc", "--registry", registry, "--ids",
                                    ",".join(map(str, ids)), "--log", s.logs[-1]],
                                   r"fake listening")[0]))
    gw, m = spawn([py, "-m", "pdmesh.cli", "gateway", "--registry", registry, "--host",
                   "127.0.0.1", "--port", "0", "--grpc-port", "0", *extra],
                  r"listening on (\S+) \(REST\)", env=env, cwd=src)  # src's pdmesh first
    s.gateway, s.url = s.add(gw), f"http://{m.group(1)}"
    cc.wait_ready(s.url)


def smg_stack(s: Stack, tmp: Path, words: list[str], smg: list[str], fakes: int) -> None:
    py = sys.executable
    urls = []
    for j in range(fakes):
        s.logs.append(str(tmp / f"smg.sends.{j}"))
        fake, m = spawn([py, FAKES, "openai", "--words", ",".join(words), "--log", s.logs[-1]],
                        r"fake listening on (\S+)")
        s.fakes.append(s.add(fake))
        urls.append(f"http://{m.group(1)}")
    port, mport = cc.free_port(), cc.free_port()
    gw = subprocess.Popen([*smg, "launch", "--worker-urls", *urls, "--host",
                           "127.0.0.1", "--port", str(port), "--prometheus-port", str(mport),
                           "--prometheus-host", "127.0.0.1", "--policy", "round_robin",
                           "--log-level", "warn"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    s.gateway, s.url = s.add(gw), f"http://127.0.0.1:{port}"
    cc.wait_ready(s.url)


def clients(stack: Stack, args, seed: int, tmp: Path, tag: str) -> dict:
    """One phase: `args.streams` streams over `args.client_procs` client processes started
    together; the merged Result and the CPU seconds of the gateway, clients and fakes."""
    k, n = args.client_procs, args.streams
    procs = []
    try:
        for j in range(k):
            share = n // k + (j < n % k)
            if not share:
                continue
            out = tmp / f"client-{tag}-{j}.json"
            cmd = [sys.executable, CLIENT, "--url", stack.url, "--streams", str(share),
                   "--max-tokens", str(args.max_tokens), "--seconds", str(args.seconds),
                   "--seed", str(seed), "--prompt-bytes", str(args.prompt_bytes),
                   "--index0", str(j), "--stride", str(k), "--total", str(n),
                   "--out", str(out)] + (["--events"] if seed else [])
            procs.append((subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}),
                          out))
        for p, _ in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"client process exited ({p.wait()})")
        g0, f0 = cpu_tree(stack.gateway.pid), {f.pid: cpu_tree(f.pid) for f in stack.fakes}
        t0 = time.monotonic()
        for p, _ in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        for p, _ in procs:
            if p.wait(args.seconds + 300):
                raise RuntimeError(f"client process exited ({p.returncode})")
        wall = time.monotonic() - t0
        g1, f1 = cpu_tree(stack.gateway.pid), {f.pid: cpu_tree(f.pid) for f in stack.fakes}
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
    parts, ccpu = [], []
    for _, out in procs:
        d = json.loads(out.read_text())
        ccpu.append(d.pop("cpu"))
        d["streams"] = [(rid, [tuple(e) for e in events]) for rid, events in d["streams"]]
        parts.append(cc.Result(**d))
    fcpu = [cpu_delta(f0[p], f1[p])[0] for p in f1]
    return {"res": cc.merge(parts), "wall": wall, "gateway": cpu_delta(g0, g1),
            "clients": (sum(ccpu), max(ccpu)), "fakes": (sum(fcpu), max(fcpu))}


def log_lines(stack: Stack) -> list[int]:
    """Finished streams in each fake's send log."""
    return [len(Path(log).read_text().splitlines()) for log in stack.logs]


def measure(stack: Stack, args, tmp: Path, tag: str) -> dict:
    """Both phases against one running stack."""
    out = {}
    ph = clients(stack, args, 0, tmp, tag + "-ceiling")
    res, wall = ph["res"], ph["wall"]
    out["tok_s"] = res.tokens / res.wall
    out["cpu_us"] = ph["gateway"][0] / max(res.tokens, 1) * 1e6
    for side in ("gateway", "clients", "fakes"):  # cores: all processes, the busiest
        out[f"{side}_cores"] = ph[side][0] / wall
        out[f"{side}_max"] = ph[side][1] / wall
    out["errors"] = res.errors
    time.sleep(0.5)  # the fakes flush their logs every 0.2 s
    out["streams_per_fake"] = log_lines(stack)
    for log in stack.logs:
        Path(log).write_text("")  # the paced phase's sends only
    ph = clients(stack, args, int(args.pace_ms * 1000), tmp, tag + "-paced")
    res = ph["res"]
    time.sleep(0.5)
    added, gaps = cc.latencies(res, stack.logs)
    out["paced_tok_s"] = res.tokens / res.wall
    out["paced_matched"] = len(added) / max(res.tokens, 1)  # tokens matched to a send
    out["errors"] += res.errors
    for name, xs in (("added", added), ("gap", gaps)):
        xs.sort()
        out[f"{name}_p50"] = cc.pct(xs, 50) * 1e3
        out[f"{name}_p99"] = cc.pct(xs, 99) * 1e3
    return out


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), platform.processor())
    import aiohttp
    import grpc
    return (f"{cpu}, {os.cpu_count()} cores (shared with other work; load average "
            f"{os.getloadavg()[0]:.2f} at start), Python {platform.python_version()}, "
            f"grpcio {grpc.__version__}, aiohttp {aiohttp.__version__}, {platform.platform()}")


def table(rows: list[tuple[str, dict]], args) -> str:
    head = ("| gateway | tok/s (ceiling) | gateway CPU µs/token | gateway cores (busiest "
            "process) | client cores (busiest) | fake cores (busiest) | paced tok/s | added "
            f"latency p50 / p99 (ms) | client ITL p50 / p99 (ms; pace {args.pace_ms:g}) | "
            "errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    return head + "".join(
        f"| {n} | {r['tok_s']:.0f} | {r['cpu_us']:.0f} | {r['gateway_cores']:.2f} "
        f"({r['gateway_max']:.2f}) | {r['clients_cores']:.2f} ({r['clients_max']:.2f}) | "
        f"{r['fakes_cores']:.2f} ({r['fakes_max']:.2f}) | {r['paced_tok_s']:.0f} | "
        f"{r['added_p50']:.2f} / {r['added_p99']:.1f} | {r['gap_p50']:.1f} / "
        f"{r['gap_p99']:.1f} | {r['errors']} |\n" for n, r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", help="a checkout (git worktree) of the older pdmesh")
    ap.add_argument("--smg", default=str(Path(sys.executable).with_name("smg")),
                    help="command running SMG's CLI, shlex-split (e.g. \"python3 -m smg\")")
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--pace-ms", type=float, default=50)
    ap.add_argument("--prompt-bytes", type=int, default=0,
                    help="prompt size (default: one short sentence)")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="client processes sharing the streams (default 1)")
    ap.add_argument("--fakes", type=int, default=1,
                    help="fake worker processes behind each gateway (default 1)")
    ap.add_argument("--only", nargs="*", help="targets to run: before after smg")
    ap.add_argument("--gateway-arg", action="append", default=[],
                    help="extra flag for this checkout's gateway, e.g. --gateway-arg=--processes=2")
    ap.add_argument("--out", help="also write the table (markdown) here")
    args = ap.parse_args()
    if args.client_procs < 1 or args.fakes < 1:
        ap.error("--client-procs and --fakes must be >= 1")
    import tempfile
    tmp = Path(tempfile.mkdtemp(prefix="gwceil-"))
    ids, words = word_ids()
    desc = machine()
    after = "pdmesh (after" + "".join(f", {a}" for a in args.gateway_arg) + ")"
    targets = [(after, "after", lambda s: pdmesh_stack(s, tmp, "after", ids, None, args.fakes,
                                                       args.gateway_arg))]
    if args.before:
        cc.link_mapped_packages(args.before)
        targets.insert(0, ("pdmesh (before)", "before",
                           lambda s: pdmesh_stack(s, tmp, "before", ids, args.before,
                                                  args.fakes)))
    smg = shlex.split(args.smg)
    if smg and (shutil.which(smg[0]) or os.path.exists(smg[0])):
        targets.append(("SMG", "smg", lambda s: smg_stack(s, tmp, words, smg, args.fakes)))
    elif not args.only or "smg" in args.only:
        print(f"SMG left out: {smg[:1]} not found", flush=True)
    rows = []
    for name, key, make in targets:
        if args.only and key not in args.only:
            continue
        stack = Stack()
        try:
            make(stack)
            rows.append((name, measure(stack, args, tmp, key)))
        finally:
            stack.close()
        print(f"{name}: {rows[-1][1]}", flush=True)
    prompt = f"{args.prompt_bytes} B prompts" if args.prompt_bytes else "short prompts"
    text = (f"{args.streams} concurrent streams over {args.client_procs} client process(es), "
            f"{args.fakes} fake worker(s) a gateway, {args.max_tokens} tokens a request, "
            f"{prompt}, {args.seconds:g} s a phase.\nMachine: {desc}\n\n" + table(rows, args))
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
