"""CPU seconds per process and thread of a process tree, from /proc (Linux), to split a
served run's CPU time per output token by process (gateway, workers, their threads).

    .venv/bin/python benchmarks/proc_cpu.py snap ROOT_PID a.json    # before the timed run
    .venv/bin/python benchmarks/proc_cpu.py snap ROOT_PID b.json    # after it
    .venv/bin/python benchmarks/proc_cpu.py diff a.json b.json OUTPUT_TOKENS [DUMP_DIR]

ROOT_PID: e.g. `pdmesh serve`'s pid (every child is counted). DUMP_DIR: files of
`py-spy dump --pid P` output, to name the threads ("engine-loop", ...). User + system
time from /proc/PID/task/TID/stat; a process that exits between the snapshots is lost.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import re
import sys

TICK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    kids = collections.defaultdict(list)
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        kids[ppid].append(int(p))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo += kids[out[-1]]
    return out


def snap(root: int) -> dict[str, float]:
    """{"PID CMDLINE | TID": cpu seconds} for every thread of the tree."""
    d = {}
    for p in tree(root):
        try:
            cmd = open(f"/proc/{p}/cmdline").read().replace("\0", " ")[:90]
            for t in os.listdir(f"/proc/{p}/task"):
                f = open(f"/proc/{p}/task/{t}/stat").read().rsplit(")", 1)[1].split()
                d[f"{p} {cmd} | {t}"] = (int(f[11]) + int(f[12])) / TICK
        except OSError:
            pass
    return d


def report(a: dict, b: dict, tokens: float, dump_dir: str | None) -> None:
    names = {}
    for f in glob.glob(f"{dump_dir}/*") if dump_dir else []:
        names.update(re.findall(r'Thread (\d+) \([^)]*\): "([^"]*)"', open(f).read()))
    proc: dict[str, float] = collections.defaultdict(float)
    threads = {}
    for k, v in b.items():
        proc[k.split(" | ")[0]] += v - a.get(k, 0)
        threads[k] = v - a.get(k, 0)
    print("CPU s   ms/token  process")
    for k, v in sorted(proc.items(), key=lambda x: -x[1]):
        print(f"{v:7.2f} {1e3 * v / tokens:8.2f}  {k}")
    print("threads (> 0.05 s):")
    for k, v in sorted(threads.items(), key=lambda x: -x[1]):
        if v > 0.05:
            tid = k.rsplit(" ", 1)[1]
            print(f"{v:7.2f} {1e3 * v / tokens:8.2f}  {k.split(' | ')[0][:60]} tid {tid} "
                  f"{names.get(tid, '')}")


def main() -> int:
    if sys.argv[1:2] == ["snap"]:
        json.dump(snap(int(sys.argv[2])), open(sys.argv[3], "w"))
    elif sys.argv[1:2] == ["diff"]:
        report(json.load(open(sys.argv[2])), json.load(open(sys.argv[3])),
               float(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else None)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
