"""KV store: write the new tokens' K and V into their pool pages.

Pool layout (model_runner.py): kv[P, L, page_size, 2, Hkv, D]; kernels take one layer's
strided view kv_layer = kv[:, layer] ([P, page_size, 2, Hkv, D]); only the last dim must
be contiguous. Token t goes to slot_mapping[t] = page * page_size + offset (as
AttnMetadata's store_pages / store_offsets); a negative slot skips the token (padding
rows of a CUDA-graph batch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_index_vector, check_last_dim_contiguous, pow2


@triton.jit
def _kv_store_kernel(k_ptr, v_ptr, kv_ptr, slot_ptr, skt, skh, svt, svh, sp, so, skv, sh,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     PAGE_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        offs_h = tl.arange(0, BLOCK_H)  # [BLOCK_H] kv heads
        offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D] head dim
        mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
        page, off = slot // PAGE_SIZE, slot % PAGE_SIZE
        dst = kv_ptr + page * sp + off * so + offs_h[:, None] * sh + offs_d[None, :]
        k = tl.load(k_ptr + t * skt + offs_h[:, None] * skh + offs_d[None, :], mask=mask)
        v = tl.load(v_ptr + t * svt + offs_h[:, None] * svh + offs_d[None, :], mask=mask)
        tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + skv, v.to(kv_ptr.dtype.element_ty), mask=mask)


def kv_store(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v: [T, Hkv, D] (any token/head strides) into kv_layer [P, page, 2, Hkv, D]
    at slot_mapping [T] (int32/int64, page * page_size + offset; < 0 = skip). In place."""
    if k.shape != v.shape or k.dim() != 3 or kv_layer.dim() != 5:
        raise ValueError(f"k, v must be [T, Hkv, D] and kv_layer [P, page, 2, Hkv, D], got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(kv_layer.shape)}")
    if tuple(kv_layer.shape[3:]) != tuple(k.shape[1:]) or slot_mapping.shape != k.shape[:1]:
        raise ValueError(f"shape mismatch: k {tuple(k.shape)}, kv_layer "
                         f"{tuple(kv_layer.shape)}, slot_mapping {tuple(slot_mapping.shape)}")
    for name, t in (("k", k), ("v", v), ("kv_layer", kv_layer)):
        check_last_dim_contiguous(name, t)
    check_index_vector("slot_mapping", slot_mapping, k.shape[0])
    if k.shape[0]:
        _kv_store_kernel[(k.shape[0],)](
            k, v, kv_layer, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            *kv_layer.stride()[:4], NUM_KV_HEADS=k.shape[1], HEAD_DIM=k.shape[2],
            PAGE_SIZE=kv_layer.shape[1], BLOCK_H=pow2(k.shape[1]), BLOCK_D=pow2(k.shape[2]),
            num_warps=4)


def slot_mapping_from(pages: torch.Tensor, offsets: torch.Tensor, page_size: int) -> torch.Tensor:
    """AttnMetadata's store_pages / store_offsets [T] -> slot_mapping [T] (int64)."""
    return pages.long() * page_size + offsets.long()


def kv_store_ref(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Torch reference, as TorchAttention.store (plus skipping negative slots). In place."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    page_size = kv_layer.shape[1]
    kv_layer[slots // page_size, slots % page_size] = torch.stack((k[keep], v[keep]), dim=1)
