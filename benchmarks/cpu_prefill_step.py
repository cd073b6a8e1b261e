"""One prefill step of the served CPU workload, in process: BATCH random-id prompts of
PROMPT tokens in one step (the CPU default budget of 512 = 2 prompts of 256), timed in
alternating windows per thread count, then one profiled step (torch.profiler, top ops by
self CPU time). Prints prompt tokens/s per thread count; the served TTFT at c=16 is about
a wave of 16 prompts divided by this rate.

    flock /tmp/pdmesh-cpu.lock .venv/bin/python benchmarks/cpu_prefill_step.py \\
        --threads 1,2 --batch 2 --prompt 256 --repeats 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import time


def prompts(eng, batch: int, length: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = eng.model_config.vocab_size
    return torch.randint(100, vocab - 100, (batch, length), generator=g).tolist()


def one_step(eng, ids: list[list[int]]) -> float:
    """Seconds of the engine step that prefills all of `ids` (fresh, uncached prompts)."""
    from pdmesh import SamplingParams

    p = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    rids = [eng.add_request(prompt_token_ids=x, params=p) for x in ids]
    t0 = time.perf_counter()
    eng.step()
    dt = time.perf_counter() - t0
    while eng.has_unfinished():  # nothing left: max_tokens=1 finishes at the prefill
        eng.step()
    assert not any(r in eng.requests for r in rids)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1", help="comma-separated thread counts")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="steps per window")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    import torch

    from pdmesh import Engine

    eng = Engine("default", prefix_cache=False,
                 max_prefill_tokens=max(a.batch * a.prompt, 1))
    threads = [int(x) for x in a.threads.split(",")]
    seed = 0
    one_step(eng, prompts(eng, a.batch, a.prompt, seed))  # warm-up
    times: dict[int, list[float]] = {t: [] for t in threads}
    for _ in range(a.repeats):
        for t in threads:
            torch.set_num_threads(t)
            w = []
            for _ in range(a.steps):
                seed += 1
                w.append(one_step(eng, prompts(eng, a.batch, a.prompt, seed)))
            times[t].append(statistics.median(w))
    n = a.batch * a.prompt
    print(f"prefill step, {a.batch} x {a.prompt} tokens, dtype "
          f"{eng.runner.kv.dtype}, load {os.getloadavg()[0]:.1f}")
    for t in threads:
        med = statistics.median(times[t])
        print(f"  threads {t}: {1e3 * med:.1f} ms / step (windows "
              f"{' '.join(f'{1e3 * x:.0f}' for x in times[t])}), {n / med:.0f} prompt tok/s")
    if a.profile:
        torch.set_num_threads(threads[0])
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            one_step(eng, prompts(eng, a.batch, a.prompt, seed + 1))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
