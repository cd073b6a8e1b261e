"""Which Triton kernels compile after an Engine is ready, under a serving-like load.

    python3 benchmarks/compile_watch.py [--batches 1 16 64 256] [--prompt-len 268] [--no-warmup]

Builds `Engine()` (PDMESH_DEVICE=cuda), then runs batches of random prompts through
`Engine.generate` (all at once: the scheduler batches their prefills as a worker's does)
and prints every Triton compile (or disk-cache load) that happened after the engine was
ready, with the kernel's specialisation: each is a stall of the engine loop while serving.
"""
from __future__ import annotations

import argparse
import random
import time

COMPILES: list[tuple[float, str]] = []
T0 = [0.0]


def _hook(*args, **kwargs) -> bool:
    COMPILES.append((time.monotonic() - T0[0], str(kwargs.get("repr", args))))
    return False


def install_hook() -> None:
    try:
        from triton import knobs
        knobs.runtime.jit_cache_hook = _hook
    except (ImportError, AttributeError):
        from triton.runtime.jit import JITFunction
        JITFunction.cache_hook = _hook


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--prompt-len", type=int, default=268)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the start-up prefill warm-up (pdmesh/runtime/warmup.py)")
    args = ap.parse_args()
    install_hook()
    if args.no_warmup:
        import pdmesh.runtime.warmup as w
        w.warm_prefill = lambda runner, shapes=(): 0.0
    from pdmesh import Engine, SamplingParams

    t = time.monotonic()
    eng = Engine()
    print(f"engine ready in {time.monotonic() - t:.1f} s (prefill warm-up "
          f"{eng.runner.warmup_s:.2f} s); {len(COMPILES)} compiles during start")
    COMPILES.clear()
    T0[0] = time.monotonic()
    rng = random.Random(1)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    for n in args.batches:
        prompts = [[rng.randrange(100, 40000) for _ in range(args.prompt_len + rng.randrange(-20, 20))]
                   for _ in range(n)]
        before, t = len(COMPILES), time.monotonic()
        eng.generate(prompt_token_ids=prompts, params=params)
        print(f"batch {n}: {time.monotonic() - t:.2f} s, {len(COMPILES) - before} compiles")
    for at, what in COMPILES:
        print(f"  +{at:6.2f} s  {what}")


if __name__ == "__main__":
    main()
