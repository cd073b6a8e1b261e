"""Where one GPU prefill step's time goes: BATCH fresh prompts of PROMPT random ids prefilled
in one `Engine.step()` (max_tokens=1, so the step is the request's whole life), timed as
the engine runs it with prefill CUDA graphs (runtime/prefill_graph.py) and without,
alternating; the eager step split: the scheduler, the batch flattened to ids/positions/
spans, the attention metadata, the forward's launches (host time, no sync), the GPU
finishing the launched work, the LM head + sampler; then cProfile's top functions over a
few eager steps.

    python benchmarks/gpu_prefill_step.py --shapes 1x280 4x280 16x280 64x280 1x64
    python benchmarks/gpu_prefill_step.py --device cpu --shapes 1x32 --repeats 2   # smoke
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time


def sync(eng) -> None:
    import torch

    if eng.runner.device.type == "cuda":
        torch.cuda.synchronize(eng.runner.device)


def add(eng, batch: int, length: int, seed: int) -> list[str]:
    import torch

    from pdmesh import SamplingParams

    g = torch.Generator().manual_seed(seed)
    vocab = eng.model_config.vocab_size
    ids = torch.randint(100, vocab - 100, (batch, length), generator=g).tolist()
    p = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    return [eng.add_request(prompt_token_ids=x, params=p) for x in ids]


def whole_step(eng, batch: int, length: int, seed: int, graphs=None) -> float:
    """Seconds of the Engine.step() that prefills `batch` fresh prompts (with `graphs`
    as the runner's prefill graphs: None = eager)."""
    eng.runner.prefill_graphs = graphs
    add(eng, batch, length, seed)
    sync(eng)
    t0 = time.perf_counter()
    eng.step()
    dt = time.perf_counter() - t0
    while eng.has_unfinished():
        eng.step()
    return dt


def parts(eng, batch: int, length: int, seed: int) -> dict[str, float]:
    """The same step through the runner's own calls, with a sync after the launches."""
    from pdmesh.runtime.sampler import sample

    add(eng, batch, length, seed)
    sync(eng)
    r, t = eng.runner, [time.perf_counter()]
    b = eng.scheduler.schedule()
    t.append(time.perf_counter())
    ids, pos, spans, last = r._flatten(b)
    t.append(time.perf_counter())
    from pdmesh.runtime.triton_backend import to_device
    import torch

    meta = r.attn_cls.build_metadata(spans, r.page_size, r.device)
    t.append(time.perf_counter())
    hidden = r._fast(to_device(torch.tensor(ids), r.device), to_device(pos, r.device), r.kv, meta)
    t.append(time.perf_counter())
    sync(eng)
    t.append(time.perf_counter())
    hidden = hidden[to_device(torch.tensor(last), r.device)]
    logits = r._fast.logits(hidden)
    sampled = [s.req for s in b.seqs if s.sample]
    for req, tok in zip(sampled, sample(logits, [eng._row(x) for x in sampled])):
        eng._append(req, tok.token_id, tok)
    t.append(time.perf_counter())
    while eng.has_unfinished():
        eng.step()
    names = ("schedule", "flatten", "metadata", "forward launches", "GPU finish", "head+sample")
    return {n: t[i + 1] - t[i] for i, n in enumerate(names)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", nargs="+", default=["1x280", "4x280", "16x280", "64x280"],
                    help="BATCHxPROMPT")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--profile-steps", type=int, default=10)
    a = ap.parse_args()
    from pdmesh import Engine

    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes]
    t0 = time.perf_counter()
    eng = Engine("default", device=a.device, prefix_cache=False,
                 max_prefill_tokens=max(b * n for b, n in shapes))
    graphs = eng.runner.prefill_graphs
    eng.runner.prefill_graphs = None
    print(f"engine ready in {time.perf_counter() - t0:.1f} s; {eng.runner.kv.dtype}, "
          f"backend {eng.runner.backend}", flush=True)
    seed = 0
    for b, n in shapes:
        for _ in range(3):  # warm: first shapes may compile
            seed += 1
            whole_step(eng, b, n, seed)
            whole_step(eng, b, n, seed + 1000, graphs)
        steps, split, replayed = [], [], []
        for _ in range(a.repeats):
            seed += 1
            steps.append(whole_step(eng, b, n, seed))
            if graphs is not None:
                seed += 1
                replayed.append(whole_step(eng, b, n, seed, graphs))
            seed += 1
            split.append(parts(eng, b, n, seed))
        med = {k: statistics.median(p[k] for p in split) for k in split[0]}
        print(f"{b}x{n}: eager step {1e3 * statistics.median(steps):.2f} ms median "
              f"(p10 {1e3 * sorted(steps)[len(steps) // 10]:.2f}, max {1e3 * max(steps):.2f}); "
              + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in med.items()), flush=True)
        if replayed:
            print(f"{b}x{n}: graph step {1e3 * statistics.median(replayed):.2f} ms median "
                  f"(p10 {1e3 * sorted(replayed)[len(replayed) // 10]:.2f}, "
                  f"max {1e3 * max(replayed):.2f})", flush=True)
    b, n = shapes[0]
    eng.runner.prefill_graphs = None
    prof = cProfile.Profile()
    for _ in range(a.profile_steps):
        seed += 1
        add(eng, b, n, seed)
        sync(eng)
        prof.enable()
        eng.step()
        sync(eng)
        prof.disable()
        while eng.has_unfinished():
            eng.step()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(f"cProfile, {a.profile_steps} steps of {b}x{n}, by own time:\n{s.getvalue()}")


if __name__ == "__main__":
    main()
