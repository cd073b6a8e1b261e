"""The gateway's ceiling: streamed tok/s and added latency per token, pdmesh vs SMG.

    .venv/bin/python benchmarks/gateway_ceiling.py [--before WORKTREE] [--smg PATH/smg]
        [--streams 256] [--max-tokens 128] [--seconds 20] [--pace-ms 50] [--out FILE.md]

Behind each gateway sits a fake that streams tokens as fast as its process can
(benchmarks/gateway_fakes_bench.py): for pdmesh a grpc.aio process serving Decode and
Prefill, registered with a real registry, in front of the real `pdmesh gateway`; for SMG
a tiny aiohttp OpenAI server behind `smg launch --worker-urls` (`pip install smg`, e.g.
into its own venv; the row is left out when --smg is not there). `--before DIR` adds the
pdmesh gateway of another checkout (a `git worktree` of an older commit), run the same
way from that folder.
Results: benchmarks/results/2026-11-29-gateway-ceiling-cpu.md.

Per gateway, two phases of `--streams` concurrent streaming chat requests (each stream
sends request after request until `--seconds` have passed):
  ceiling  the fake streams as fast as it can: client tok/s and the gateway process's CPU
           time per streamed token (utime + stime of it and its children, /proc);
  paced    the fake sends one token per `--pace-ms` per stream: added latency per token
           (the client's receive time minus the fake's send time; one monotonic clock)
           and the client's inter-token gap, p50 / p99.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ceiling_client as cc  # noqa: E402

HERE = Path(__file__).resolve().parent
FAKES = str(HERE / "gateway_fakes_bench.py")
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


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its descendants, from /proc (clock ticks)."""
    tick, total, todo = os.sysconf("SC_CLK_TCK"), 0.0, [pid]
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
        total += (int(fields[11]) + int(fields[12])) / tick
        todo += children.get(p, [])
    return total


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
    """The processes of one target; `url` is its OpenAI base, `gateway` the process measured."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.url, self.gateway, self.log = "", None, ""

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
                 extra: list[str] = ()) -> None:
    py = sys.executable
    s.log = str(tmp / f"{name}.sends")
    env = {"PYTHONPATH": src} if src else {}
    reg, m = spawn([py, "-m", "pdmesh.cli", "registry", "--host", "127.0.0.1", "--port", "0",
                    "--heartbeat-interval", "1"], r"listening on (\S+)")
    s.add(reg)
    registry = m.group(1)
    s.add(spawn([py, FAKES, "grpc", "--registry", registry, "--ids", ",".join(map(str, ids)),
                 "--log", s.log], r"fake listening")[0])
    gw, m = spawn([py, "-m", "pdmesh.cli", "gateway", "--registry", registry, "--host",
                   "127.0.0.1", "--port", "0", "--grpc-port", "0", *extra],
                  r"listening on (\S+) \(REST\)", env=env, cwd=src)  # src's pdmesh first
    s.gateway, s.url = s.add(gw), f"http://{m.group(1)}"
    cc.wait_ready(s.url)


def smg_stack(s: Stack, tmp: Path, words: list[str], smg: str) -> None:
    py = sys.executable
    s.log = str(tmp / "smg.sends")
    fake, m = spawn([py, FAKES, "openai", "--words", ",".join(words), "--log", s.log],
                    r"fake listening on (\S+)")
    s.add(fake)
    port, mport = cc.free_port(), cc.free_port()
    gw = subprocess.Popen([smg, "launch", "--worker-urls", f"http://{m.group(1)}", "--host",
                           "127.0.0.1", "--port", str(port), "--prometheus-port", str(mport),
                           "--prometheus-host", "127.0.0.1", "--policy", "round_robin",
                           "--log-level", "warn"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    s.gateway, s.url = s.add(gw), f"http://127.0.0.1:{port}"
    cc.wait_ready(s.url)


def measure(stack: Stack, args) -> dict:
    """Both phases against one running stack."""
    out = {}
    c0, t0 = cpu_seconds(stack.gateway.pid), time.monotonic()
    res = asyncio.run(cc.load(stack.url, args.streams, args.max_tokens, args.seconds, 0))
    wall, cpu = time.monotonic() - t0, cpu_seconds(stack.gateway.pid) - c0
    out["tok_s"] = res.tokens / res.wall
    out["cpu_us"] = cpu / max(res.tokens, 1) * 1e6
    out["errors"] = res.errors
    Path(stack.log).write_text("")  # the paced phase's sends only
    res = asyncio.run(cc.load(stack.url, args.streams, args.max_tokens, args.seconds,
                              int(args.pace_ms * 1000)))
    added, gaps = cc.latencies(res, stack.log)
    out["paced_tok_s"] = res.tokens / res.wall
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
    head = ("| gateway | tok/s (ceiling) | gateway CPU µs/token | paced tok/s | added latency "
            f"p50 / p99 (ms) | client ITL p50 / p99 (ms; pace {args.pace_ms:g}) | errors |\n"
            "|---|---:|---:|---:|---:|---:|---:|\n")
    return head + "".join(
        f"| {n} | {r['tok_s']:.0f} | {r['cpu_us']:.0f} | {r['paced_tok_s']:.0f} | "
        f"{r['added_p50']:.2f} / {r['added_p99']:.1f} | {r['gap_p50']:.1f} / "
        f"{r['gap_p99']:.1f} | {r['errors']} |\n" for n, r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", help="a checkout (git worktree) of the older pdmesh")
    ap.add_argument("--smg", default=str(Path(sys.executable).with_name("smg")))
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--pace-ms", type=float, default=50)
    ap.add_argument("--prompt-bytes", type=int, default=0,
                    help="prompt size (default: one short sentence)")
    ap.add_argument("--only", nargs="*", help="targets to run: before after smg")
    ap.add_argument("--gateway-arg", action="append", default=[],
                    help="extra flag for this checkout's gateway, e.g. --gateway-arg=--processes=2")
    ap.add_argument("--out", help="also write the table (markdown) here")
    args = ap.parse_args()
    cc.set_prompt_bytes(args.prompt_bytes)
    import tempfile
    tmp = Path(tempfile.mkdtemp(prefix="gwceil-"))
    ids, words = word_ids()
    desc = machine()
    after = "pdmesh (after" + "".join(f", {a}" for a in args.gateway_arg) + ")"
    targets = [(after, "after", lambda s: pdmesh_stack(s, tmp, "after", ids, None,
                                                       args.gateway_arg))]
    if args.before:
        cc.link_mapped_packages(args.before)
        targets.insert(0, ("pdmesh (before)", "before",
                           lambda s: pdmesh_stack(s, tmp, "before", ids, args.before)))
    if os.path.exists(args.smg):
        targets.append(("SMG", "smg", lambda s: smg_stack(s, tmp, words, args.smg)))
    rows = []
    for name, key, make in targets:
        if args.only and key not in args.only:
            continue
        stack = Stack()
        try:
            make(stack)
            rows.append((name, measure(stack, args)))
        finally:
            stack.close()
        print(f"{name}: {rows[-1][1]}", flush=True)
    prompt = f"{args.prompt_bytes} B prompts" if args.prompt_bytes else "short prompts"
    text = (f"{args.streams} concurrent streams, {args.max_tokens} tokens a request, "
            f"{prompt}, {args.seconds:g} s a phase.\nMachine: {desc}\n\n" + table(rows, args))
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
