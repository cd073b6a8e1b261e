"""SiLU-and-mul: the MLP's activation over the fused gate_up_proj output.

x: [T, 2I] laid out gate | up (model.py's MLP splits it the same way) -> out [T, I] =
silu(gate) * up. Rounding matches the torch path: silu is rounded to the input dtype
before the multiply, as F.silu(gate) * up does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import check_last_dim_contiguous, output, pow2


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, stride_xt, stride_ot,
                         BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] columns of this program
    mask = offs < inter
    gate = tl.load(x_ptr + t * stride_xt + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + t * stride_xt + inter + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)  # silu, rounded like F.silu
    tl.store(out_ptr + t * stride_ot + offs, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None,
                 block: int = 1024, num_warps: int = 4) -> torch.Tensor:
    """x: [T, 2I] (gate | up) -> out [T, I] = silu(gate) * up."""
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be [T, 2I], got {tuple(x.shape)}")
    check_last_dim_contiguous("x", x)
    t, inter = x.shape[0], x.shape[1] // 2
    out = output(out, (t, inter), x)
    block = min(block, pow2(inter))
    if t:
        grid = (t, triton.cdiv(inter, block))
        _silu_and_mul_kernel[grid](x, out, inter, x.stride(0), out.stride(0),
                                   BLOCK=block, num_warps=num_warps)
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Torch reference, exactly model.py's MLP: x [T, 2I] -> [T, I]."""
    gate, up = x.split(x.shape[-1] // 2, dim=-1)
    return F.silu(gate) * up
