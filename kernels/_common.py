"""Small helpers shared by the kernel launch wrappers (host side only)."""
from __future__ import annotations

import torch
import triton

LOG2E = 1.4426950408889634


def pow2(n: int, floor: int = 1) -> int:
    """Smallest power of two >= max(n, floor) (Triton block shapes must be powers of two)."""
    return max(triton.next_power_of_2(max(int(n), 1)), floor)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 ("ieee") for fp32 inputs, else the tensor-core path.

    Triton's default for fp32 is tf32, ~1e-3 relative error, which would make fp32 results
    differ from the torch reference by far more than fp32 rounding.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    """Kernels index the last dim with unit stride; any other strides are passed through."""
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: last dim must be contiguous, got strides {tuple(t.stride())}")


def check_index_vector(name: str, t: torch.Tensor, n: int) -> None:
    """Per-token / per-sequence index tensors are read as plain contiguous int arrays."""
    if t.dim() != 1 or t.shape[0] != n or not t.is_contiguous() or t.is_floating_point():
        raise ValueError(f"{name}: expected a contiguous int vector of length {n}, got "
                         f"{tuple(t.shape)} {t.dtype} strides {tuple(t.stride())}")


def output(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor,
           name: str = "out") -> torch.Tensor:
    """Return `out` after checking shape/dtype/device, or a fresh tensor shaped like that."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"{name}: expected {tuple(shape)} {like.dtype} on {like.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    check_last_dim_contiguous(name, out)
    return out
