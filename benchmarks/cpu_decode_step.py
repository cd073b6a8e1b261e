"""One decode step of the default model on CPU, per attention backend, in this process.

BATCH requests of PROMPT random-id tokens are prefilled, decoded to ~CTX tokens of
context, then STEPS decode steps are timed (median of --repeats windows) and one window
is profiled (torch.profiler, inclusive op times over the window's wall time): the share
of the step in attention (torch: SDPA + the page gather; cpu: the C++ kernel) and in the
linears. Backends alternate window by window, so
the machine's load hits both alike.

    flock /tmp/pdmesh-cpu.lock .venv/bin/python benchmarks/cpu_decode_step.py --threads 1
    flock /tmp/pdmesh-cpu.lock .venv/bin/python benchmarks/cpu_decode_step.py --attention-only --ctx 272
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

ATTN_OPS = ("aten::scaled_dot_product_attention", "aten::index_select",
            "pdmesh_cpu::paged_decode_attention")
LINEAR_OPS = ("mkldnn::_linear_pointwise",)


def make_engine(backend: str, a: argparse.Namespace):
    """An Engine of `backend` holding BATCH sequences decoded to ~CTX tokens."""
    from pdmesh import Engine, SamplingParams

    eng = Engine("default", attention_backend=backend, num_pages=1024)
    assert eng.runner.backend == backend, eng.runner.backend
    g = torch.Generator().manual_seed(0)
    vocab = eng.model_config.vocab_size
    params = SamplingParams(max_tokens=a.ctx + a.steps * (2 * a.repeats + 4), temperature=0, ignore_eos=True)
    for p in torch.randint(100, vocab - 100, (a.batch, a.prompt), generator=g).tolist():
        eng.add_request(prompt_token_ids=p, params=params)
    while eng.scheduler.waiting or eng.scheduler.prefilling or \
            min(r.num_tokens for r in eng.scheduler.decoding) < a.ctx:
        eng.step()
    assert len(eng.scheduler.decoding) == a.batch
    return eng


def time_window(eng, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    return (time.perf_counter() - t) / steps


def profile_shares(eng, steps: int) -> dict:
    """ms per step and the shares of it (inclusive op times / wall) in attention and
    linears, from one profiled window."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        total = time_window(eng, steps)
    incl = {ev.key: ev.cpu_time_total for ev in prof.key_averages()}
    wall_us = 1e6 * total * steps
    attn = {k: v for k, v in incl.items() if k in ATTN_OPS}
    lin = sum(v for k, v in incl.items() if k in LINEAR_OPS)
    layers = eng.model_config.num_layers
    return {"profiled_ms": 1e3 * total, "attention_share": sum(attn.values()) / wall_us,
            "linear_share": lin / wall_us,
            "attention_us_per_layer": sum(attn.values()) / steps / layers,
            "attention_ops": {k: round(v / steps / layers) for k, v in attn.items()}}


def attention_only(a: argparse.Namespace) -> None:
    """One layer's decode attention alone (--attention-only): BATCH sequences of CTX tokens
    in random pages of a bf16 pool of the default model's shape with POOL_LAYERS layers
    (30: a layer's pages are strided as in the runtime, K/V come from DRAM; 1: the pool
    fits in L3), torch path (gather + SDPA) vs the kernel, µs per layer call."""
    from pdmesh.runtime.attention import AttnMetadata, SeqSpan, TorchAttention
    from pdmesh.runtime.cpu_attention import CpuPagedAttention

    page, hkv, d, h = 16, 3, 64, 9
    n_pages = -(-a.ctx // page)
    g = torch.Generator().manual_seed(0)
    for layers, pages in ((30, 2 * a.batch * n_pages), (1, a.batch * n_pages + 8)):
        kv = torch.randn(pages, layers, page, 2, hkv, d, generator=g).to(torch.bfloat16)
        perm = torch.randperm(pages, generator=g)
        spans = [SeqSpan(i, 1, a.ctx, perm[i * n_pages:(i + 1) * n_pages].clone())
                 for i in range(a.batch)]
        q = torch.randn(a.batch, h, d, generator=g).to(torch.bfloat16)
        res = {}
        for _ in range(a.repeats):  # alternate the two, keep each one's best window
            for name, attn, meta in (("torch", TorchAttention(h, hkv, d), AttnMetadata.build(spans, page)),
                                     ("cpu", CpuPagedAttention(h, hkv, d),
                                      CpuPagedAttention.build_metadata(spans, page))):
                t = time.perf_counter()
                for i in range(60):
                    attn.forward(q, kv[:, i % layers], meta)
                res[name] = min(res.get(name, 1e9), (time.perf_counter() - t) / 60)
        print(f"attention only, pool of {layers} layer(s), batch {a.batch} x {a.ctx} tokens, "
              f"threads {a.threads}: " + ", ".join(f"{k} {1e6 * v:.0f} us" for k, v in res.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="torch,cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=270)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--attention-only", action="store_true",
                    help="time one layer's decode attention alone (no model)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.attention_only:
        attention_only(a)
        return
    engines = {b: make_engine(b, a) for b in a.backends.split(",")}
    for eng in engines.values():
        time_window(eng, 2)  # warm
    times = {b: [] for b in engines}
    for _ in range(a.repeats):
        for b, eng in engines.items():
            times[b].append(time_window(eng, a.steps))
    ctx = {b: e.scheduler.decoding[0].num_tokens for b, e in engines.items()}
    for b, eng in engines.items():
        prof = profile_shares(eng, a.steps)
        print(f"{b:6s} threads={a.threads} batch={a.batch} ctx~{ctx[b]}: "
              f"median {1e3 * statistics.median(times[b]):.1f} ms/step "
              f"(windows {', '.join(f'{1e3 * t:.1f}' for t in times[b])}); profiled "
              f"{prof['profiled_ms']:.1f} ms, attention {100 * prof['attention_share']:.0f}% "
              f"({prof['attention_us_per_layer']:.0f} us/layer {prof['attention_ops']}), "
              f"linears {100 * prof['linear_share']:.0f}%")


if __name__ == "__main__":
    main()
