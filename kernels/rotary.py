"""Rotary embedding on q and k, rotate-half (neox / Hugging Face) style, as model.py.

The cos/sin cache is built from `pdmesh.rope.rope_inv_freq` (llama3 scaling included),
the one the runtime uses too:
cache[pos] = cos(pos * inv_freq) | sin(pos * inv_freq), fp32 [max_pos, D] (D/2 each),
which are exactly the values CausalLM.forward computes per position. The kernel rounds
like the torch path (cos/sin cast to the activation dtype; each product rounded before
the sum), so its output equals pdmesh.rope.apply_rope's in every dtype up to fp32 FMA
contraction.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdmesh.config import RopeScaling
from pdmesh.rope import apply_rope, rope_inv_freq

from ._common import check_index_vector, check_last_dim_contiguous, output, pow2


def rope_cos_sin_cache(head_dim: int, theta: float, scaling: RopeScaling | None,
                       max_positions: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """-> fp32 cache [max_positions, head_dim]: cos | sin of pos * inv_freq ([.., D/2] each).

    Computed on `device` with the same ops as CausalLM.forward (inv_freq from the host,
    product and cos/sin on the device), so the values are bit-identical to the runtime's
    on that device (CUDA's cos/sin differ from the CPU's by an ulp)."""
    inv = rope_inv_freq(head_dim, theta, scaling).to(device)  # [D/2]
    freqs = torch.arange(max_positions, device=device).float()[:, None] * inv[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_pos, D]


@triton.jit
def _rotate(x_ptr, o_ptr, sxt, sxh, sot, soh, t, n_heads, c, s,
            HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate [n_heads, 2*HALF] of token t; c, s: [BLOCK_HALF] fp32 (already rounded).
    Returns the rotated halves ([BLOCK_H, BLOCK_HALF] each) and their mask."""
    offs_h = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    offs_d = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BLOCK_HALF]
    mask = (offs_h < n_heads) & (offs_d < HALF)
    src = x_ptr + t * sxt + offs_h * sxh + offs_d
    x1 = tl.load(src, mask=mask, other=0.0)  # [BLOCK_H, BLOCK_HALF] first half
    x2 = tl.load(src + HALF, mask=mask, other=0.0)  # second half
    dt = x1.dtype
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    c, s = c[None, :], s[None, :]
    o1 = ((x1f * c).to(dt).to(tl.float32) - (x2f * s).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2f * c).to(dt).to(tl.float32) + (x1f * s).to(dt).to(tl.float32)).to(dt)
    dst = o_ptr + t * sot + offs_h * soh + offs_d
    tl.store(dst, o1, mask=mask)
    tl.store(dst + HALF, o2, mask=mask)
    return o1, o2, mask


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cache_ptr, v_ptr, kv_ptr, slot_ptr,
                   n_q, n_k, sqt, sqh, skt, skh, sqot, sqoh, skot, skoh, scache,
                   svt, svh, sp, so, skv, sh,
                   HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                   BLOCK_HALF: tl.constexpr, STORE_KV: tl.constexpr, PAGE_SIZE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    m = offs < HALF
    row = cache_ptr + pos * scache
    dt = q_ptr.dtype.element_ty
    c = tl.load(row + offs, mask=m, other=0.0).to(dt).to(tl.float32)  # [BLOCK_HALF]
    s = tl.load(row + HALF + offs, mask=m, other=0.0).to(dt).to(tl.float32)
    _rotate(q_ptr, qo_ptr, sqt, sqh, sqot, sqoh, t, n_q, c, s, HALF, BLOCK_HQ, BLOCK_HALF)
    k1, k2, mask = _rotate(k_ptr, ko_ptr, skt, skh, skot, skoh, t, n_k, c, s, HALF, BLOCK_HK,
                           BLOCK_HALF)
    if STORE_KV:  # also write rotated k and v into the pool slot (as kv_store)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            offs_h = tl.arange(0, BLOCK_HK)[:, None]
            offs_d = tl.arange(0, BLOCK_HALF)[None, :]
            dst = kv_ptr + (slot // PAGE_SIZE) * sp + (slot % PAGE_SIZE) * so + offs_h * sh + offs_d
            tl.store(dst, k1.to(kv_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + HALF, k2.to(kv_ptr.dtype.element_ty), mask=mask)
            src = v_ptr + t * svt + offs_h * svh + offs_d
            tl.store(dst + skv, tl.load(src, mask=mask), mask=mask)
            tl.store(dst + skv + HALF, tl.load(src + HALF, mask=mask), mask=mask)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor, inplace: bool = False,
                     q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None,
                     v: torch.Tensor | None = None, kv_layer: torch.Tensor | None = None,
                     slot_mapping: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], k: [T, Hkv, D] (any token/head strides, e.g. views of the qkv output);
    positions: [T] int; cos_sin_cache: fp32 [max_pos, D] -> (q rotated, k rotated).

    inplace=True overwrites q and k; otherwise writes q_out / k_out (allocated if None).
    With v [T, Hkv, D], kv_layer [P, page, 2, Hkv, D] and slot_mapping [T] also given, the
    rotated k and v are stored into the pool as kv_store does (one launch instead of two)."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[::2] != k.shape[::2]:
        raise ValueError(f"q, k must be [T, H, D] and [T, Hkv, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    d = q.shape[-1]
    if d % 2 or cos_sin_cache.shape[-1] != d or positions.shape != q.shape[:1]:
        raise ValueError(f"head_dim {d} must be even and match cos_sin_cache "
                         f"{tuple(cos_sin_cache.shape)}; positions {tuple(positions.shape)}")
    for name, t in (("q", q), ("k", k), ("cos_sin_cache", cos_sin_cache)):
        check_last_dim_contiguous(name, t)
    check_index_vector("positions", positions, q.shape[0])
    if inplace:
        q_out, k_out = q, k
    q_out = output(q_out, tuple(q.shape), q, "q_out")
    k_out = output(k_out, tuple(k.shape), k, "k_out")
    store = _store_args(k, v, kv_layer, slot_mapping)
    if q.shape[0]:
        _rotary_kernel[(q.shape[0],)](
            q, k, q_out, k_out, positions, cos_sin_cache, *store[:3], q.shape[1], k.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), q_out.stride(0),
            q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin_cache.stride(0),
            *store[3:], HALF=d // 2, BLOCK_HQ=pow2(q.shape[1]), BLOCK_HK=pow2(k.shape[1]),
            BLOCK_HALF=pow2(d // 2), STORE_KV=kv_layer is not None,
            PAGE_SIZE=kv_layer.shape[1] if kv_layer is not None else 1, num_warps=4)
    return q_out, k_out


def _store_args(k, v, kv_layer, slot_mapping) -> tuple:
    """(v, kv_layer, slot_mapping, svt, svh, sp, so, skv, sh) for the fused store, or dummies."""
    given = [x is not None for x in (v, kv_layer, slot_mapping)]
    if not any(given):
        return (k, k, k) + (0,) * 6
    if not all(given):
        raise ValueError("the fused KV store needs all of v, kv_layer and slot_mapping")
    if (v.shape != k.shape or kv_layer.dim() != 5 or tuple(kv_layer.shape[3:]) != tuple(k.shape[1:])
            or slot_mapping.shape != k.shape[:1]):
        raise ValueError(f"fused store shapes: k {tuple(k.shape)}, v {tuple(v.shape)}, kv_layer "
                         f"{tuple(kv_layer.shape)}, slot_mapping {tuple(slot_mapping.shape)}")
    check_last_dim_contiguous("v", v)
    check_last_dim_contiguous("kv_layer", kv_layer)
    check_index_vector("slot_mapping", slot_mapping, k.shape[0])
    return (v, kv_layer, slot_mapping, v.stride(0), v.stride(1), *kv_layer.stride()[:4])


def rotary_embedding_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                         cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference via pdmesh.rope.apply_rope: same inputs -> (q rotated, k rotated)."""
    cos, sin = cos_sin_cache[positions.long()].chunk(2, dim=-1)  # [T, D/2] each
    cos = torch.cat((cos, cos), dim=-1)[:, None, :].to(q.dtype)  # [T, 1, D]
    sin = torch.cat((sin, sin), dim=-1)[:, None, :].to(q.dtype)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
