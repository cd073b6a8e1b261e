"""serve_gpu.py's profiles: py-spy (raw collapsed stacks) and /proc CPU time over a window,
on a set of processes, summarised as each process's top functions by own samples."""
from __future__ import annotations

import collections
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from serve_common import log

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
