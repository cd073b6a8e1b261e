"""RMSNorm, plain and with the residual add fused in (vLLM's fused_add_rms_norm).

Numerics follow model.py's RMSNorm (as Hugging Face): the row is normalised in fp32,
rounded to the input dtype, then multiplied by the weight and rounded again. The fused
form first rounds x + residual to the input dtype (what `x = x + attn(...)` stores) and
normalises that, returning it as the new residual.

One program per row; a row (hidden size up to 16K) fits one block.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_last_dim_contiguous, output, pow2


@triton.jit
def _rmsnorm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, r_out_ptr, dim, eps,
                    sx0, sx1, sr0, so0, so1, sro0,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    i0 = tl.program_id(0).to(tl.int64)
    i1 = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK)  # [BLOCK] over the normalised dim
    mask = offs < dim
    x = tl.load(x_ptr + i0 * sx0 + i1 * sx1 + offs, mask=mask, other=0.0)
    dtype = x.dtype
    xf = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + i0 * sr0 + offs, mask=mask, other=0.0)
        x = (xf + r.to(tl.float32)).to(dtype)  # the new residual, rounded as torch stores it
        xf = x.to(tl.float32)
        tl.store(r_out_ptr + i0 * sro0 + offs, x, mask=mask)
    var = tl.sum(xf * xf, axis=0) / dim
    normed = (xf * tl.rsqrt(var + eps)).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + i0 * so0 + i1 * so1 + offs, (w * normed).to(dtype), mask=mask)


def _warps(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [R, D] or [T, H, D] (any row strides, e.g. q/k views of a qkv output); weight: [D]
    -> out, shaped like x. Used for the layer norms and for qwen3's per-head q/k norm."""
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [R, D] or [T, H, D], got {tuple(x.shape)}")
    check_last_dim_contiguous("x", x)
    out = output(out, tuple(x.shape), x)
    x3, o3 = (x, out) if x.dim() == 3 else (x[:, None], out[:, None])  # [N0, N1, D]
    block = pow2(x.shape[-1])
    if x.numel():
        _rmsnorm_kernel[(x3.shape[0], x3.shape[1])](
            x3, x3, weight, o3, o3, x.shape[-1], eps, x3.stride(0), x3.stride(1), 0,
            o3.stride(0), o3.stride(1), 0, HAS_RESIDUAL=False, BLOCK=block,
            num_warps=_warps(block))
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float, out: torch.Tensor | None = None,
                       residual_out: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, D]; weight: [D] -> (norm(x + residual) [T, D], x + residual [T, D]).

    In place is allowed: pass out=x and/or residual_out=residual (each row is read whole
    before it is written)."""
    if x.dim() != 2 or residual.shape != x.shape:
        raise ValueError(f"x and residual must both be [T, D], got {tuple(x.shape)} "
                         f"and {tuple(residual.shape)}")
    check_last_dim_contiguous("x", x)
    check_last_dim_contiguous("residual", residual)
    out = output(out, tuple(x.shape), x)
    residual_out = output(residual_out, tuple(x.shape), x, "residual_out")
    block = pow2(x.shape[-1])
    if x.numel():
        _rmsnorm_kernel[(x.shape[0], 1)](
            x, residual, weight, out, residual_out, x.shape[-1], eps, x.stride(0), 0,
            residual.stride(0), out.stride(0), 0, residual_out.stride(0),
            HAS_RESIDUAL=True, BLOCK=block, num_warps=_warps(block))
    return out, residual_out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Torch reference, exactly model.py's RMSNorm.forward."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: (rms_norm(x + residual), x + residual)."""
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual
