"""The served benchmark's workload against one Engine in this process, no serving stack:
NUM random-id prompts of IN tokens, OUT output tokens each (ignore_eos), at most CONC in
flight (a finished request's slot takes the next prompt at once, as bench_serving's
--max-concurrency does). Prints output tok/s, mean and P99 TTFT and mean TPOT per
variant, variants alternating round by round under the CPU lock, each in a fresh process.

    .venv/bin/python benchmarks/cpu_engine_closed_loop.py --threads 1 --rounds 2 \\
        --variant 4096=PDMESH_MAX_PREFILL_TOKENS=4096,PDMESH_MIXED_STEPS=0 \\
        --variant 512-mixed=PDMESH_MAX_PREFILL_TOKENS=512,PDMESH_MIXED_STEPS=1

A variant is NAME=K=V,K=V (environment for that process; empty: the defaults). It
isolates the engine's scheduling (prefill budget, mixed steps, threads) from the
gateway, gRPC and the machine's other processes.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time


def run_one(a: argparse.Namespace) -> dict:
    """One closed-loop run in this process; returns its figures."""
    import torch

    from pdmesh import Engine, SamplingParams

    torch.set_num_threads(a.threads)
    eng = Engine("default")
    g = torch.Generator().manual_seed(a.seed)
    vocab = eng.model_config.vocab_size
    prompts = torch.randint(100, vocab - 100, (a.num + a.conc, a.input_len), generator=g).tolist()
    params = SamplingParams(max_tokens=a.output_len, temperature=0, ignore_eos=True)
    for p in prompts[a.num:]:  # warm-up: one untimed wave
        eng.add_request(prompt_token_ids=p, params=params)
    while eng.has_unfinished():
        eng.step()
    started, first, done, nxt = {}, {}, {}, 0
    t0 = time.perf_counter()
    while len(done) < a.num:
        while nxt < a.num and len(started) - len(done) < a.conc:
            rid = eng.add_request(prompt_token_ids=prompts[nxt], params=params)
            started[rid], nxt = time.perf_counter(), nxt + 1
        for out in eng.step():
            now = time.perf_counter()
            first.setdefault(out.request_id, now)
            if out.finished:
                done[out.request_id] = now
    wall = time.perf_counter() - t0
    ttft = sorted(first[r] - started[r] for r in started)
    tpot = [(done[r] - first[r]) / (a.output_len - 1) for r in started]
    return {"tok_s": a.num * a.output_len / wall, "mean_ttft": statistics.mean(ttft),
            "p99_ttft": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
            "tpot_ms": 1e3 * statistics.mean(tpot)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", action="append", default=[], help="NAME=K=V,K=V")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--conc", type=int, default=16)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--lock", default="/tmp/pdmesh-cpu.lock")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child mode
    a = p.parse_args()
    if a.one:
        print(json.dumps(run_one(a)))
        return 0
    variants = [(v.partition("=")[0], v.partition("=")[2]) for v in a.variant] or [("default", "")]
    res: dict[str, list[dict]] = {n: [] for n, _ in variants}
    for r in range(a.rounds):
        for name, envs in (variants if r % 2 == 0 else variants[::-1]):
            env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
            env.update(kv.split("=", 1) for kv in envs.split(",") if kv)
            cmd = [sys.executable, __file__, "--one", "--threads", str(a.threads),
                   "--num", str(a.num), "--conc", str(a.conc), "--input-len", str(a.input_len),
                   "--output-len", str(a.output_len), "--seed", str(a.seed + r)]
            with open(a.lock, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            res[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {name} {res[name][-1]}", file=sys.stderr, flush=True)
    print(f"threads {a.threads}, {a.num} prompts of {a.input_len} -> {a.output_len} tokens, "
          f"concurrency {a.conc}, {a.rounds} rounds (median, min-max)")
    print("| variant | output tok/s | mean TTFT s | P99 TTFT s | mean TPOT ms |")
    print("|---|---|---|---|---|")
    for name, _ in variants:
        cells = []
        for k, fmt in (("tok_s", "{:.1f}"), ("mean_ttft", "{:.3f}"), ("p99_ttft", "{:.3f}"),
                       ("tpot_ms", "{:.1f}")):
            v = [x[k] for x in res[name]]
            cells.append(f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
