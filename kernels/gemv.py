"""Fused GEMV for small-batch decode: y = epilogue(prologue(x) @ W^T) in one kernel.

At batch 1-4 every decoder linear is a matrix-vector product that must stream the whole
weight from HBM; what is left to win is the kernels around it (each a launch plus a ramp
of a few microseconds, ~9 per layer). This kernel folds them into the GEMV:

- prologue `norm_weight`: RMSNorm of x (the layer norms before qkv and gate_up). The sum
  of squares is accumulated in the same K loop and applied at the end, so nothing waits
  for it: y = rsqrt(mean(x^2) + eps) * sum_k x_k g_k W_nk.
- epilogue `silu_mul`: W is gate_up [2I, K]; the program owning gate columns n also owns
  up columns I + n, and writes silu(gate) * up [M, I] (no [M, 2I] round trip).
- epilogue `residual`: y = residual + y (the residual adds after o_proj and down_proj);
  `out=residual` updates it in place (each element is read and written by one program).

Rounding: the matmul result is rounded to the activation dtype first (as F.linear's
output is), then silu / residual follow the torch path's roundings. The norm prologue is
the one difference from the unfused ops: the normalised x is not rounded to the dtype
before the product (it never exists as a tensor), so it is slightly more exact.

Each program owns BLOCK_N output columns over the whole K. One row: a [BLOCK_N, BLOCK_K]
fp32 accumulator on CUDA cores, reduced over K once at the end (no per-iteration
shuffles). Two to four rows: tl.dot on tensor cores with the rows padded to 16 (the
normalised x is then rounded to the weight dtype, as the unfused path rounds it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import check_last_dim_contiguous, dot_precision, output

MAX_ROWS = 4
# (BLOCK_N, BLOCK_K, num_warps, num_stages, prefetch) per row bucket (1: CUDA cores,
# BLOCK_N * BLOCK_K fp32 accumulators per program; 4: tensor cores, rows padded to 16);
# prefetch: the kernel itself loads the next W tile before using the current one (two
# tiles in flight per program whether or not Triton pipelines the loop). The runtime
# times these per weight at start-up.
CONFIGS = {1: ((4, 1024, 4, 3, False), (8, 512, 4, 3, False), (8, 1024, 8, 3, False),
               (16, 512, 8, 3, False), (8, 256, 4, 4, False), (16, 256, 4, 4, False),
               (4, 1024, 4, 1, True), (8, 512, 4, 1, True), (8, 1024, 8, 1, True),
               (16, 512, 8, 1, True), (4, 512, 4, 1, True), (16, 256, 4, 1, True)),
           4: ((16, 256, 4, 4, False), (16, 128, 4, 6, False), (32, 128, 4, 4, False),
               (32, 256, 4, 3, False), (64, 128, 4, 4, False), (16, 512, 4, 3, False),
               (16, 128, 4, 1, True), (32, 128, 8, 1, True))}
DEFAULT = {1: CONFIGS[1][1], 4: CONFIGS[4][0]}


def row_bucket(m: int) -> int:
    """Config bucket for m rows: 1, or 4 for 2-4 rows (the tensor-core form)."""
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"fused_gemv takes 1-{MAX_ROWS} rows, got {m}")
    return 1 if m == 1 else MAX_ROWS


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, g_ptr, r_ptr, y_ptr, M, N, K, up_rows, eps,
                 sxm, swn, srm, sym,
                 HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SILU_MUL: tl.constexpr,
                 RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr, USE_DOT: tl.constexpr,
                 PREFETCH: tl.constexpr,
                 DOT_PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * swn  # [BN, 1]
    u_rows = w_rows + up_rows * swn  # gate_up: the up half (unused otherwise)
    if USE_DOT:  # [BM, BN] accumulators, tensor cores
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    else:  # [BM, BN, BK], reduced over K after the loop
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    sumsq = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    if PREFETCH:  # the first W tile(s); the loop loads tile i + 1 before using tile i
        wmask = n_mask[:, None] & (offs_k < K)[None, :]
        w_next = tl.load(w_rows + offs_k[None, :], mask=wmask, other=0.0)
        u_next = tl.load(u_rows + offs_k[None, :], mask=wmask & SILU_MUL, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = (k < K) | EVEN_K
        if PREFETCH:
            w, u = w_next, u_next
            wmask = n_mask[:, None] & (k + BLOCK_K < K)[None, :]
            w_next = tl.load(w_rows + (k + BLOCK_K)[None, :], mask=wmask, other=0.0)
            u_next = tl.load(u_rows + (k + BLOCK_K)[None, :], mask=wmask & SILU_MUL, other=0.0)
        else:
            wmask = n_mask[:, None] & k_mask[None, :]
            w = tl.load(w_rows + k[None, :], mask=wmask, other=0.0)  # [BN, BK]
            u = tl.load(u_rows + k[None, :], mask=wmask & SILU_MUL, other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * sxm + k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        wdt = x.dtype
        x = x.to(tl.float32)
        if NORM:
            sumsq += x * x
            x = x * tl.load(g_ptr + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        if USE_DOT:
            xd = x.to(wdt)
            acc = tl.dot(xd, tl.trans(w), acc, input_precision=DOT_PREC)
            if SILU_MUL:
                acc_up = tl.dot(xd, tl.trans(u), acc_up, input_precision=DOT_PREC)
        else:
            acc += x[:, None, :] * w.to(tl.float32)[None, :, :]
            if SILU_MUL:
                acc_up += x[:, None, :] * u.to(tl.float32)[None, :, :]
    dtype = y_ptr.dtype.element_ty
    if USE_DOT:
        y = acc
    else:
        y = tl.sum(acc, axis=2)  # [BM, BN]
    if NORM:
        scale = tl.rsqrt(tl.sum(sumsq, axis=1) / K + eps)  # [BM]
        y = y * scale[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = y.to(dtype).to(tl.float32)  # the matmul's output rounding
    if SILU_MUL:
        if USE_DOT:
            up = acc_up
        else:
            up = tl.sum(acc_up, axis=2)
        if NORM:
            up = up * scale[:, None]
        up = up.to(dtype).to(tl.float32)
        y = (y / (1.0 + tl.exp(-y))).to(dtype).to(tl.float32) * up  # F.silu(gate) * up
    out_mask = m_mask[:, None] & n_mask[None, :]
    if RESIDUAL:
        r = tl.load(r_ptr + offs_m[:, None] * srm + offs_n[None, :], mask=out_mask, other=0.0)
        y = y.to(dtype).to(tl.float32) + r.to(tl.float32)
    tl.store(y_ptr + offs_m[:, None] * sym + offs_n[None, :], y.to(dtype), mask=out_mask)


def fused_gemv(x: torch.Tensor, w: torch.Tensor, *, bias: torch.Tensor | None = None,
               norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
               silu_mul: bool = False, residual: torch.Tensor | None = None,
               out: torch.Tensor | None = None, config: tuple | None = None) -> torch.Tensor:
    """x: [M <= 4, K], w: [N, K] -> [M, N] (or [M, N/2] with silu_mul, W = gate | up).

    norm_weight: [K], RMSNorm x first; residual: [M, N_out], added last (out=residual
    for in place); config: (BLOCK_N, BLOCK_K, num_warps, num_stages, prefetch), default per rows."""
    m, k = x.shape
    n = w.shape[0]
    if w.dim() != 2 or w.shape[1] != k or x.dtype != w.dtype:
        raise ValueError(f"fused_gemv: x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}")
    check_last_dim_contiguous("x", x)
    check_last_dim_contiguous("w", w)
    if silu_mul and (n % 2 or bias is not None):
        raise ValueError(f"silu_mul needs W = gate | up with an even row count and no bias, "
                         f"got {tuple(w.shape)}")
    if norm_weight is not None and tuple(norm_weight.shape) != (k,):
        raise ValueError(f"norm_weight must be [{k}], got {tuple(norm_weight.shape)}")
    n_out = n // 2 if silu_mul else n
    if residual is not None:
        if tuple(residual.shape) != (m, n_out):
            raise ValueError(f"residual must be [{m}, {n_out}], got {tuple(residual.shape)}")
        check_last_dim_contiguous("residual", residual)
    y = output(out, (m, n_out), x)
    bucket = row_bucket(m)
    bn, bk, warps, stages, prefetch = config or DEFAULT[bucket]
    r = residual if residual is not None else y
    _gemv_kernel[(triton.cdiv(n_out, bn),)](
        x, w, bias if bias is not None else w, norm_weight if norm_weight is not None else w,
        r, y, m, n_out, k, n_out, eps, x.stride(0), w.stride(0), r.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, NORM=norm_weight is not None, SILU_MUL=silu_mul,
        RESIDUAL=residual is not None, EVEN_K=k % bk == 0, USE_DOT=bucket > 1,
        PREFETCH=prefetch, DOT_PREC=dot_precision(x.dtype), BLOCK_M=16 if bucket > 1 else 1,
        BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return y


def fused_gemv_ref(x: torch.Tensor, w: torch.Tensor, *, bias: torch.Tensor | None = None,
                   norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                   silu_mul: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference: the unfused ops of model.py (RMSNorm, F.linear, silu * up, + residual)."""
    if norm_weight is not None:
        xf = x.float()
        x = norm_weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = F.linear(x, w, bias)
    if silu_mul:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y if residual is None else residual + y
