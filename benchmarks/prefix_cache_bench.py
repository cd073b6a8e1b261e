"""Prefix cache on vs off, engine level (no RPC), side by side in one run.

Two workloads, each run with the cache off and on, alternating (off, on, off, on, ...) so
that a machine whose load drifts treats both alike:

  shared   a shared system prompt (--system-len tokens) + a distinct question per request
  noreuse  random prompts of the same length (nothing to reuse: the cache's overhead)

A closed loop keeps --concurrency requests in flight until --requests have finished.
TTFT is the engine's (arrival to first token, Request timestamps); throughput is
(prompt + output tokens) / wall time and output tokens / wall time, and (prompt + output
tokens) / CPU seconds of this process: on a shared machine whose load varies, the CPU
figure is the steadier measure of what the work costs (one torch thread by default). One warm-up request
per run (not measured) so both modes start from a warm model; in "on" mode it also
leaves the system prompt cached, as a serving worker would have it.

    .venv/bin/python benchmarks/prefix_cache_bench.py            # CPU, SmolLM2-135M
"""
from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time

from pdmesh import Engine, SamplingParams
from pdmesh.runtime.loader import load_model


def make_prompts(kind: str, n: int, system_len: int, question_len: int, vocab: int,
                 seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(1000, vocab) for _ in range(k)]  # noqa: E731
    if kind == "shared":
        system = tok(system_len)
        return [system + tok(question_len) for _ in range(n)]
    return [tok(system_len + question_len) for _ in range(n)]


def run(engine: Engine, prompts: list[list[int]], concurrency: int, out_len: int) -> dict:
    params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    engine.generate(prompt_token_ids=prompts[0], params=params)  # warm-up
    todo, live, ttft, cached = list(prompts[1:]), {}, [], []
    out_tokens = prompt_tokens = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while todo or live:
        while todo and len(live) < concurrency:
            ids = todo.pop(0)
            rid = engine.add_request(prompt_token_ids=ids, params=params)
            live[rid] = engine.requests[rid]
        for out in engine.step():
            if out.finished:
                req = live.pop(out.request_id)
                ttft.append(req.first_token_time - req.arrival_time)
                cached.append(out.cached_tokens)
                out_tokens += len(out.token_ids)
                prompt_tokens += len(out.prompt_token_ids)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    engine.flush_cache()
    ttft.sort()
    return {"n": len(ttft), "wall": wall, "tok_s": (prompt_tokens + out_tokens) / wall,
            "cpu": cpu, "tok_cpu_s": (prompt_tokens + out_tokens) / cpu,
            "out_tok_s": out_tokens / wall, "ttft_mean": statistics.fmean(ttft),
            "ttft_p50": ttft[len(ttft) // 2], "ttft_p90": ttft[int(len(ttft) * 0.9)],
            "hit": sum(cached) / prompt_tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--requests", type=int, default=16, help="measured requests per run")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--system-len", type=int, default=512)
    ap.add_argument("--question-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="off/on pairs per workload")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workloads", default="noreuse,shared", help="comma-separated")
    args = ap.parse_args()
    kinds = args.workloads.split(",")

    loaded = load_model(args.model)
    common = dict(loaded=loaded, num_pages=2048, page_size=16, num_threads=args.threads)
    engines = {False: Engine(**common, prefix_cache=False),
               True: Engine(**common, prefix_cache=True)}
    vocab = loaded.config.vocab_size
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"# prefix cache bench: model {args.model}, dtype {engines[True].runner.kv.dtype}, "
          f"commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# {' '.join(sys.argv)}")
    print(f"# {args.requests} requests per run (+1 warm-up), concurrency {args.concurrency}, "
          f"prompt {args.system_len}+{args.question_len} tokens, output {args.output_len}, "
          f"page 16, {args.rounds} off/on rounds per workload, alternating")
    print()
    print("| workload | cache | round | wall s | tok/s (in+out) | out tok/s | tok/CPU-s "
          "| TTFT mean ms | TTFT p50 ms | TTFT p90 ms | cached share of prompt |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    summary: dict[tuple[str, bool], list[dict]] = {}
    for kind in kinds:
        for rnd in range(args.rounds):
            prompts = make_prompts(kind, args.requests + 1, args.system_len,
                                   args.question_len, vocab, args.seed + rnd)
            for on in (False, True):
                r = run(engines[on], prompts, args.concurrency, args.output_len)
                summary.setdefault((kind, on), []).append(r)
                print(f"| {kind} | {'on' if on else 'off'} | {rnd + 1} | {r['wall']:.2f} | "
                      f"{r['tok_s']:.0f} | {r['out_tok_s']:.1f} | {r['tok_cpu_s']:.0f} | "
                      f"{r['ttft_mean'] * 1e3:.0f} | "
                      f"{r['ttft_p50'] * 1e3:.0f} | {r['ttft_p90'] * 1e3:.0f} | "
                      f"{r['hit']:.1%} |", flush=True)
    print()
    print("medians over the rounds:")
    print()
    print("| workload | off tok/s | on tok/s | on/off | off tok/CPU-s | on tok/CPU-s | on/off "
          "| off TTFT mean ms | on TTFT mean ms | off/on TTFT |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        off, on = summary[(kind, False)], summary[(kind, True)]
        t_off = statistics.median(r["tok_s"] for r in off)
        t_on = statistics.median(r["tok_s"] for r in on)
        c_off = statistics.median(r["tok_cpu_s"] for r in off)
        c_on = statistics.median(r["tok_cpu_s"] for r in on)
        f_off = statistics.median(r["ttft_mean"] for r in off)
        f_on = statistics.median(r["ttft_mean"] for r in on)
        print(f"| {kind} | {t_off:.0f} | {t_on:.0f} | {t_on / t_off:.2f}x | {c_off:.0f} | "
              f"{c_on:.0f} | {c_on / c_off:.2f}x | "
              f"{f_off * 1e3:.0f} | {f_on * 1e3:.0f} | {f_off / f_on:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
