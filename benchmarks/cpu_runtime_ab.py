"""A/B of `pdmesh bench-runtime` on CPU: several (source tree, dtype) variants measured
side by side, alternating variant order round by round, each round a fresh process.

    .venv/bin/python benchmarks/cpu_runtime_ab.py --variant base=/tmp/pdm-base:float32 \
        --variant new=.:bfloat16 --rounds 3 [bench-runtime args after --]

A variant is NAME=TREE:DTYPE, TREE a folder holding the `pdmesh` package to import (e.g.
`git archive <commit> pdmesh | tar -x -C /tmp/x`). Every figure is printed as the median
over rounds with its min-max spread, so machine noise (shared cores) shows.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", action="append", required=True, help="NAME=TREE:DTYPE")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lock", default="/tmp/pdmesh-cpu.lock",
                   help="held exclusively around each run (other benchmarks take it too)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then bench-runtime arguments")
    a = p.parse_args()
    rest = [x for x in a.rest if x != "--"] or ["--batch-sizes", "1", "16", "--repeats", "3"]
    variants = []
    for v in a.variant:
        name, _, spec = v.partition("=")
        tree, _, dtype = spec.rpartition(":")
        variants.append((name, str(Path(tree).resolve()), dtype))
    results: dict[str, list[list[dict]]] = {n: [] for n, _, _ in variants}
    with tempfile.TemporaryDirectory() as d:
        for r in range(a.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for name, tree, dtype in order:
                out = os.path.join(d, f"{name}-{r}.json")
                env = dict(os.environ, PYTHONPATH=tree, PDMESH_DTYPE=dtype,
                           OMP_NUM_THREADS=str(a.threads))
                cmd = [sys.executable, "-c",
                       "import sys; from pdmesh.cli import main; sys.exit(main())",
                       "bench-runtime", "--no-transformers", "--threads", str(a.threads),
                       "--json", out, *rest]
                with open(a.lock, "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    subprocess.run(cmd, env=env, check=True, cwd=tree, stdout=subprocess.DEVNULL)
                results[name].append(json.load(open(out)))
                print(f"round {r + 1}: {name} done", file=sys.stderr, flush=True)
    figures = [row["figure"] for row in next(iter(results.values()))[0]]
    names = [n for n, _, _ in variants]
    print(f"rounds: {a.rounds}, threads: {a.threads}, args: {' '.join(rest)}")
    print("variants: " + ", ".join(f"{n} = {t} ({d})" for n, t, d in variants))
    print()
    print("| figure | " + " | ".join(f"{n} median (min-max)" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for i, fig in enumerate(figures):
        cells = []
        for n in names:
            vals = [run[i]["pdmesh"] for run in results[n]]
            unit = results[n][0][i]["unit"]
            cells.append(f"{statistics.median(vals):.1f} {unit} ({min(vals):.1f}-{max(vals):.1f})")
        print(f"| {fig} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
