"""Paged decode attention (one query token per sequence), GQA, split-K for long contexts.

One program per (sequence, kv head, split) loads the query heads that share its kv head
as one [BLOCK_G, D] tile (padded to 16 rows, tl.dot's minimum), so each K/V byte is read
once per kv head, and walks its token range in BLOCK_N-token tiles gathered through the
page table, with an online (exp2) softmax. With num_splits > 1 (flash-decoding) each
split writes its normalised partial output and log-sum-exp, and a second kernel merges
them; split count depends only on tensor shapes, so the launch is CUDA-graph safe.

Semantics = TorchAttention (pdmesh/runtime/attention.py): scale D^-0.5, head h reads kv
head h // (H / Hkv), the query sees all ctx_len tokens of its sequence.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (LOG2E, check_index_vector, check_last_dim_contiguous, dot_precision,
                      output, pow2)


@triton.jit
def _decode_split_kernel(
        q_ptr, kv_ptr, table_ptr, lens_ptr, out_ptr, part_o_ptr, part_lse_ptr,
        qk_scale, split_len, table_tokens, sqb, sqh, sp, so, skv, sh, stb, sob, soh,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
        NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hkv = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    offs_g = tl.arange(0, BLOCK_G)  # [BLOCK_G] query heads of this kv head
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = hkv * GROUP + offs_g
    q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max (log2 units)
    l = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    kv_head = kv_ptr + hkv * sh
    table = table_ptr + b * stb
    # page ids of the first tile; each iteration fetches the next tile's, so the K/V loads
    # hang off a loop-carried value and the pipeliner multi-buffers them (num_stages - 1).
    # Masked by the table's capacity, not by ctx, so this load need not wait for ctx's:
    # entries past ctx are read but the K/V loads they address are masked off.
    page = tl.load(table + (start + offs_n) // PAGE_SIZE, mask=start + offs_n < table_tokens,
                   other=0)
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + offs_n  # [BLOCK_N] token positions
        n_mask = tok < end
        row = kv_head + page.to(tl.int64) * sp + (tok % PAGE_SIZE) * so  # [BLOCK_N]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(row[:, None] + skv + offs_d[None, :], mask=kv_mask, other=0.0)
        nxt = tok + BLOCK_N
        page = tl.load(table + nxt // PAGE_SIZE, mask=nxt < table_tokens, other=0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BLOCK_G, BLOCK_N]
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m = m_new
    l_safe = tl.where(l > 0, l, 1.0)  # an empty range (ctx 0, or a split past ctx) -> 0, lse -inf
    o = acc / l_safe[:, None]
    o_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + b * sob + heads[:, None] * soh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        # partials: part_o [B, H, S, D] fp32, part_lse [B, H, S] fp32 (log2 units)
        row_bh = (b * GROUP * tl.num_programs(1) + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(part_o_ptr + row_bh[:, None] * HEAD_DIM + offs_d[None, :], o, mask=o_mask)
        lse = tl.where(l > 0, m + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + row_bh, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(part_o_ptr, part_lse_ptr, out_ptr, num_heads, sob, soh,
                          HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)  # [BLOCK_S] splits
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    base = (b * num_heads + h) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + offs_s, mask=s_mask, other=float("-inf"))
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(lse - mx)  # [BLOCK_S], 0 for empty splits
    denom = tl.sum(w, 0)
    o = tl.load(part_o_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    res = tl.sum(o * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)  # [BLOCK_D]
    tl.store(out_ptr + b * sob + h * soh + offs_d, res.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (an H100's 132 elsewhere, e.g. the interpreter)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(batch: int, num_kv_heads: int, max_ctx: int, block_n: int,
                      num_sms: int = 132, min_tokens_per_split: int = 64) -> int:
    """Splits so that batch * kv_heads * splits roughly fills 2 waves of SMs, each split
    keeping >= min_tokens_per_split tokens. Depends on shapes only (CUDA-graph safe)."""
    want = max(1, (2 * num_sms) // max(1, batch * num_kv_heads))
    cap = max(1, max_ctx // max(min_tokens_per_split, block_n))
    return max(1, min(want, cap))


def paged_decode_attention(
        q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
        context_lens: torch.Tensor, scale: float | None = None, num_splits: int | None = None,
        out: torch.Tensor | None = None, block_n: int | None = None, num_warps: int = 4,
        num_stages: int = 3, min_split_tokens: int = 64) -> torch.Tensor:
    """q: [B, H, D]; kv_layer: [P, page, 2, Hkv, D] (e.g. the strided view kv[:, layer]);
    block_tables: [B, max_pages] int32/int64 page ids (entries past a sequence's pages are
    never read); context_lens: [B] int (tokens of KV per sequence, >= 1; 0 gives zeros)
    -> out [B, H, D]. num_splits None = choose_num_splits (splits of >= min_split_tokens);
    1 = no split-K.

    Defaults (H100, D=128, bf16): 4 warps, 3 stages, K/V tiles double-buffered through
    cp.async; 64-token tiles, 32 when batch * kv_heads fills 2 waves of SMs (measured on
    an H100: b=64 ctx=4096 8B-shaped, 399 -> 358 us, ~3.0 TB/s = the copy bandwidth).
    Small batches are latency-bound (~1.5 us per tile iteration measured at b=1), so
    split-K goes down to one 64-token tile per split (min_split_tokens=64)."""
    bsz, nh, d = q.shape
    _, page_size, _, nkv, dkv = kv_layer.shape
    if dkv != d or nh % nkv or block_tables.shape[0] != bsz or context_lens.shape != (bsz,):
        raise ValueError(f"shapes: q {tuple(q.shape)}, kv_layer {tuple(kv_layer.shape)}, "
                         f"block_tables {tuple(block_tables.shape)}, context_lens "
                         f"{tuple(context_lens.shape)}")
    for name, t in (("q", q), ("kv_layer", kv_layer), ("block_tables", block_tables)):
        check_last_dim_contiguous(name, t)
    check_index_vector("context_lens", context_lens, bsz)
    out = output(out, (bsz, nh, d), q)
    if bsz == 0:
        return out
    max_ctx = block_tables.shape[1] * page_size
    sms = _num_sms(q.device)
    if block_n is None:
        block_n = 32 if bsz * nkv >= 2 * sms else 64
    if num_splits is None:
        num_splits = choose_num_splits(bsz, nkv, max_ctx, block_n, sms, min_split_tokens)
    split_len = triton.cdiv(triton.cdiv(max_ctx, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_ctx, split_len)
    scale = d ** -0.5 if scale is None else scale
    group = nh // nkv
    part_o = part_lse = out  # unused when num_splits == 1
    if num_splits > 1:
        part_o = torch.empty(bsz, nh, num_splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(bsz, nh, num_splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(bsz, nkv, num_splits)](
        q, kv_layer, block_tables, context_lens, out, part_o, part_lse,
        scale * LOG2E, split_len, max_ctx, q.stride(0), q.stride(1), *kv_layer.stride()[:4],
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=d, PAGE_SIZE=page_size, NUM_SPLITS=num_splits,
        BLOCK_G=pow2(group, 16), BLOCK_D=pow2(d, 16), BLOCK_N=block_n,
        DOT_PREC=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)
    if num_splits > 1:
        _decode_reduce_kernel[(bsz, nh)](
            part_o, part_lse, out, nh, out.stride(0), out.stride(1), HEAD_DIM=d,
            NUM_SPLITS=num_splits, BLOCK_S=pow2(num_splits), BLOCK_D=pow2(d), num_warps=4)
    return out


def paged_decode_attention_ref(q: torch.Tensor, kv_layer: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """Torch reference (gather whole pages, mask past ctx, SDPA with GQA) -> [B, H, D]."""
    page_size = kv_layer.shape[1]
    g = kv_layer[block_tables.long()].flatten(1, 2)  # [B, max_pages * page, 2, Hkv, D]
    k, v = g[:, :, 0].transpose(1, 2), g[:, :, 1].transpose(1, 2)  # [B, Hkv, N, D]
    n = block_tables.shape[1] * page_size
    mask = torch.arange(n, device=q.device)[None, :] < context_lens[:, None].to(q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :],
                                         scale=scale, enable_gqa=True)  # [B, H, 1, D]
    return out[:, :, 0, :]

