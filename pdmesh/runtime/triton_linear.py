"""Skinny matmuls for decode (M <= 16 rows): y = x @ W^T through a Triton kernel, used
per weight only where it beats cuBLAS on this GPU (measured once at startup).

Decode reads every weight once per step, so the linears are memory-bound; cuBLAS's
choice for M = 1..16 reaches ~1.3-2.5 TB/s on the 8B shapes of an H100 (measured), well
under the ~3 TB/s copy bandwidth for the smaller matrices. Both kernels give each program
BLOCK_N output columns over the whole K (no split-K, deterministic) and keep several W
tiles in flight (num_stages): "dot" pads the rows to 16 for tl.dot (tensor cores, up to
16 rows), "gemv" reduces on CUDA cores with small BLOCK_N (1-4 rows).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdmesh.runtime import tuning_cache

MAX_ROWS = 16
GEMV_ROWS = 4  # the CUDA-core kernel ("gemv") serves up to this many rows
# (kernel, BLOCK_N, BLOCK_K, num_warps, num_stages) tried per weight shape
CONFIGS = (("dot", 16, 256, 4, 4), ("dot", 16, 128, 4, 6), ("dot", 32, 128, 4, 4),
           ("dot", 32, 256, 4, 3), ("dot", 64, 128, 4, 4),
           ("gemv", 4, 512, 4, 4), ("gemv", 8, 512, 4, 4), ("gemv", 8, 256, 4, 6),
           ("gemv", 16, 256, 4, 4), ("gemv", 8, 1024, 8, 3))


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, sxm, swn, sym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """CUDA-core variant for 1-4 rows: each W tile [BLOCK_N, BLOCK_K] (16-byte loads along
    K) is multiplied into every row and reduced over K in fp32; small BLOCK_N gives many
    programs, so enough W bytes are in flight to approach the bandwidth."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * swn + k[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        x = tl.load(x_ptr + offs_m[:, None] * sxm + k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    tl.store(y_ptr + offs_m[:, None] * sym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, y_ptr, M, N, K, sxm, swn, sym,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * swn + k[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        x = tl.load(x_ptr + offs_m[:, None] * sxm + k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
    tl.store(y_ptr + offs_m[:, None] * sym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def skinny_linear(x: torch.Tensor, w: torch.Tensor, config=CONFIGS[0]) -> torch.Tensor:
    """x: [M <= 16, K], w: [N, K] (both last-dim contiguous, same dtype) -> [M, N]."""
    m, k = x.shape
    n = w.shape[0]
    if m > MAX_ROWS or w.shape[1] != k or x.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError(f"skinny_linear: x {tuple(x.shape)}, w {tuple(w.shape)}")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    kind, bn, bk, warps, stages = config
    args = (x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0))
    if kind == "gemv":
        if m > GEMV_ROWS:
            raise ValueError(f"the gemv kernel takes at most {GEMV_ROWS} rows, got {m}")
        _gemv_kernel[(triton.cdiv(n, bn),)](*args, BLOCK_M=triton.next_power_of_2(m),
                                            BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                                            num_stages=stages)
        return y
    _skinny_kernel[(triton.cdiv(n, bn),)](*args, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk,
                                          DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
                                          num_warps=warps, num_stages=stages)
    return y


def _bucket(rows: int) -> int:
    return 1 if rows <= GEMV_ROWS else 16  # rows tuned for: 1 stands for 1-4, 16 for 5-16


class LinearDispatch:
    """Per weight and row bucket: cuBLAS (F.linear) or skinny_linear with its best config.

    `tune(modules)` times both on the live GPU (rows 1 and 16) and keeps whichever is
    faster; untuned weights and M > 16 always use F.linear."""

    def __init__(self) -> None:
        self.choice: dict[tuple[int, int], tuple] = {}  # (weight ptr, bucket) -> config

    def __call__(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        cfg = self.choice.get((module.weight.data_ptr(), _bucket(m))) if m <= MAX_ROWS else None
        if cfg is None:
            return module(x)
        y = skinny_linear(x, module.weight, cfg)
        return y if module.bias is None else y + module.bias

    def tune(self, modules: list[torch.nn.Module]) -> dict[str, float]:
        """Pick per weight; returns {"shape@rows": speedup over cuBLAS} (1.0 = cuBLAS kept)."""
        report, by_shape = {}, {}
        for mod in modules:
            w = mod.weight
            for rows in (1, 16):
                key = (tuple(w.shape), w.dtype, rows)
                if key not in by_shape:
                    k = tuning_cache.key("skinny", torch.cuda.get_device_name(w.device), *key)
                    cfg, ratio = tuning_cache.cached(k, lambda: _pick(w, rows))
                    by_shape[key] = None if cfg is None else tuple(cfg)
                    report[f"{tuple(w.shape)}@{rows}"] = ratio
                if by_shape[key] is not None:
                    self.choice[(w.data_ptr(), rows)] = by_shape[key]
        return report


def _pick(w: torch.Tensor, rows: int) -> list:
    """[best config or None (cuBLAS), cuBLAS time / best time] for `w` at `rows` rows."""
    from triton.testing import do_bench

    x = torch.randn(rows, w.shape[1], device=w.device, dtype=w.dtype)
    ref = torch.nn.functional.linear(x, w).float()
    base = do_bench(lambda: torch.nn.functional.linear(x, w), warmup=5, rep=25,
                    return_mode="median")
    best, best_t = None, base
    for cfg in CONFIGS:
        if cfg[0] == "gemv" and rows > 1:  # the rows <= 4 bucket is tuned at 1 row
            continue
        err = (skinny_linear(x, w, cfg).float() - ref).norm() / ref.norm().clamp_min(1e-30)
        if not err < 1e-2:  # never keep a config that computes something else
            continue
        t = do_bench(lambda: skinny_linear(x, w, cfg), warmup=5, rep=25, return_mode="median")
        if t < best_t * 0.97:  # a clear win only
            best, best_t = cfg, t
    return [None if best is None else list(best), round(base / best_t, 2)]
