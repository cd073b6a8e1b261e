"""Kernel micro-benchmark and config sweep on one CUDA GPU: `python -m pdmesh.kernels.bench`.

Decode attention is timed under a CUDA graph (as the runtime replays it) and reported as
achieved GB/s of the K/V bytes it must read, next to the device-to-device copy bandwidth
measured in the same run; prefill attention as causal TFLOP/s next to torch's SDPA
(flash) on the same shapes. Each shape sweeps block sizes / warps / stages and prints
the best, so the wrappers' defaults can be set from data. --quick sweeps less.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from .paged_decode_attention import paged_decode_attention
from .prefill_attention import prefill_attention

MODELS = {"llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}  # H, Hkv, D
DECODE_SHAPES = [(1, 512), (1, 4096), (16, 512), (16, 4096), (64, 512), (64, 4096)]  # batch, ctx
PREFILL_SHAPES = [(0, 512), (0, 4096), (4096, 512)]  # cached prefix, new tokens
PAGE = 16
DEVICE = "cuda"


def _pool(lens: list[int], hkv: int, d: int, layers: int = 2):
    """Random bf16 pool [P, L, page, 2, Hkv, D] and shuffled tables [B, W] int32."""
    n = [-(-c // PAGE) for c in lens]
    kv = torch.randn(sum(n) + 1, layers, PAGE, 2, hkv, d, device=DEVICE, dtype=torch.bfloat16)
    perm = torch.randperm(sum(n)) + 1
    tables = torch.zeros(len(lens), max(n), dtype=torch.int32)
    off = 0
    for b, k in enumerate(n):
        tables[b, :k] = perm[off: off + k]
        off += k
    return kv, tables.to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s (read + write) of a 1 GiB buffer."""
    a = torch.empty(1 << 29, dtype=torch.int16, device=DEVICE)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=5, rep=50)
    return 2 * a.numel() * 2 / ms / 1e6


def bench_decode(quick: bool) -> list[dict]:
    rows = []
    configs = list(itertools.product((None, 32, 64, 128), (4, 8), (2, 3, 4)))
    if quick:
        configs = [(None, 4, 3), (32, 4, 3), (64, 8, 3), (128, 8, 2)]
    splits_modes = [(None, 256), (None, 128), (None, 64), (1, 256)]  # (num_splits, min tokens)
    for model, (h, hkv, d) in MODELS.items():
        for bsz, ctx in DECODE_SHAPES:
            kv, tables, lens = _pool([ctx] * bsz, hkv, d)
            q = torch.randn(bsz, h, d, device=DEVICE, dtype=torch.bfloat16)
            gbytes = bsz * ctx * 2 * hkv * d * 2 / 1e9
            best = default = None
            for (bn, nw, ns), (splits, min_tok) in itertools.product(configs, splits_modes):
                def run():
                    return paged_decode_attention(q, kv[:, 1], tables, lens, num_splits=splits,
                                                  block_n=bn, num_warps=nw, num_stages=ns,
                                                  min_split_tokens=min_tok)
                try:
                    run()
                except Exception as e:  # a config can exceed shared memory: skip it
                    print(f"  skip bn={bn} w{nw} s{ns}: {type(e).__name__}", flush=True)
                    continue
                us = do_bench_cudagraph(run, rep=50) * 1e3
                r = dict(model=model, batch=bsz, ctx=ctx, block_n=bn or "auto", num_warps=nw,
                         num_stages=ns, splits=splits or f"auto>={min_tok}", us=round(us, 2),
                         gbps=round(gbytes / us * 1e6, 1))
                if best is None or us < best["us"]:
                    best = r
                if (bn, nw, ns, splits, min_tok) == (None, 4, 3, None, 64):
                    default = r
            rows.append(dict(best, default_us=default["us"]))
            print(f"decode {model} b={bsz} ctx={ctx}: default {default['us']} us "
                  f"({default['gbps']} GB/s); best {best['us']} us ({best['gbps']} GB/s) "
                  f"bn={best['block_n']} w={best['num_warps']} s={best['num_stages']} "
                  f"splits={best['splits']}", flush=True)
    return rows


def bench_prefill(quick: bool) -> list[dict]:
    rows = []
    configs = list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)))
    if quick:
        configs = [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]
    for model, (h, hkv, d) in MODELS.items():
        for prefix, qlen in PREFILL_SHAPES:
            ctx = prefix + qlen
            kv, tables, lens = _pool([ctx], hkv, d)
            q = torch.randn(qlen, h, d, device=DEVICE, dtype=torch.bfloat16)
            cu = torch.tensor([0, qlen], dtype=torch.int32, device=DEVICE)
            flops = 4 * h * d * (qlen * prefix + qlen * (qlen + 1) / 2)  # QK^T + PV, causal
            best = default = None
            for bm, bn, nw, ns in configs:
                def run():
                    return prefill_attention(q, kv[:, 1], tables, cu, lens, qlen, block_m=bm,
                                             block_n=bn, num_warps=nw, num_stages=ns)
                try:
                    run()
                except Exception as e:  # a config can exceed shared memory: skip it
                    print(f"  skip {bm}x{bn} w{nw} s{ns}: {type(e).__name__}", flush=True)
                    continue
                ms = do_bench(run, warmup=5, rep=30)
                r = dict(model=model, prefix=prefix, q=qlen, block_m=bm, block_n=bn,
                         num_warps=nw, num_stages=ns, ms=round(ms, 3),
                         tflops=round(flops / ms / 1e9, 1))
                if best is None or ms < best["ms"]:
                    best = r
                if (bm, bn, nw, ns) == (128, 64, 8, 3):
                    default = r
            sdpa = _sdpa_tflops(h, hkv, d, prefix, qlen, flops) if prefix == 0 else None
            rows.append(dict(best, sdpa_tflops=sdpa, default_tflops=default["tflops"]))
            print(f"prefill {model} prefix={prefix} q={qlen}: default {default['tflops']} "
                  f"TFLOP/s; best {best['tflops']} TFLOP/s "
                  f"({best['ms']} ms) {best['block_m']}x{best['block_n']} w={best['num_warps']} "
                  f"s={best['num_stages']}; torch SDPA {sdpa} TFLOP/s", flush=True)
    return rows


def _sdpa_tflops(h: int, hkv: int, d: int, prefix: int, qlen: int, flops: float) -> float:
    q = torch.randn(1, h, qlen, d, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(1, h, qlen, d, device=DEVICE, dtype=torch.bfloat16)  # GQA expanded
    ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True), rep=30)
    return round(flops / ms / 1e9, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="sweep a few configs only")
    ap.add_argument("--only", choices=("decode", "prefill"), help="one kernel family")
    ap.add_argument("--json", help="write all rows to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the kernels' CPU tests run under TRITON_INTERPRET=1)")
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bandwidth():.0f} GB/s", flush=True)
    out = {}
    if args.only != "prefill":
        out["decode"] = bench_decode(args.quick)
    if args.only != "decode":
        out["prefill"] = bench_prefill(args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
