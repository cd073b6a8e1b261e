"""Prefill attention: causal, variable-length packed batch, over a cached paged prefix.

The flat batch packs B sequences' new query tokens (cu_seqlens_q, as flash-attn's varlen
API). Sequence b has context_lens[b] tokens of KV in its pages after this forward: a
cached prefix of context_lens[b] - q_len tokens plus the new tokens, whose K/V the
runtime has already stored (kv_store runs before attention, as in model.py). Query t of
sequence b (absolute position prefix + t) attends to keys 0 .. prefix + t, all read from
the pages; chunked prefill and prefix reuse are the prefix > 0 case.

Grid: (query block, sequence, head). Key tiles wholly below the query block's first
position run without the causal mask; only the tiles on the diagonal compute it.
Semantics = TorchAttention._one (scale D^-0.5, head h reads kv head h // (H / Hkv)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (LOG2E, check_index_vector, check_last_dim_contiguous, dot_precision,
                      output, pow2)


@triton.jit
def _attend_tiles(acc, m, l, q, kv_head, table_row, lo, hi, last_pos, rows_pos,
                  qk_scale, sp, so, skv, offs_d, d_mask, offs_n,
                  PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    """Online softmax over key tiles [lo, hi); MASKED applies causality (key <= row pos)
    and the bound key <= last_pos. rows_pos: [BLOCK_M] absolute positions of the rows."""
    # page ids are fetched one tile ahead (loop-carried) so K/V loads can be multi-buffered
    page = tl.load(table_row + (lo + offs_n) // PAGE_SIZE, mask=lo + offs_n <= last_pos, other=0)
    for n0 in range(lo, hi, BLOCK_N):
        tok = n0 + offs_n  # [BLOCK_N]
        n_mask = tok <= last_pos
        row = kv_head + page.to(tl.int64) * sp + (tok % PAGE_SIZE) * so  # [BLOCK_N]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(row[:, None] + skv + offs_d[None, :], mask=kv_mask, other=0.0)
        nxt = tok + BLOCK_N
        page = tl.load(table_row + nxt // PAGE_SIZE, mask=nxt <= last_pos, other=0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N]
        if MASKED:
            qk = tl.where(tok[None, :] <= rows_pos[:, None], qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m = m_new
    return acc, m, l


@triton.jit
def _prefill_kernel(q_ptr, kv_ptr, table_ptr, cu_ptr, lens_ptr, out_ptr, qk_scale,
                    sqt, sqh, sp, so, skv, sh, stb, sot, soh,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    qb = tl.num_programs(0) - 1 - tl.program_id(0)  # longest (last) query blocks start first
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    m0 = qb * BLOCK_M
    if m0 < q_len:
        prefix = tl.load(lens_ptr + b) - q_len
        offs_m = m0 + tl.arange(0, BLOCK_M)  # [BLOCK_M] query rows within the sequence
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        m_mask = offs_m < q_len
        d_mask = offs_d < HEAD_DIM
        tok_q = (q_start + offs_m).to(tl.int64)  # [BLOCK_M] rows of the flat batch
        q = tl.load(q_ptr + tok_q[:, None] * sqt + h * sqh + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        rows_pos = prefix + offs_m  # absolute positions
        last_pos = prefix + tl.minimum(m0 + BLOCK_M, q_len) - 1  # last key any row sees
        full_end = ((prefix + m0 + 1) // BLOCK_N) * BLOCK_N  # tiles every row sees whole
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        kv_head = kv_ptr + (h // GROUP) * sh
        table_row = table_ptr + b * stb
        acc, m, l = _attend_tiles(acc, m, l, q, kv_head, table_row, 0, full_end, last_pos,
                                  rows_pos, qk_scale, sp, so, skv, offs_d, d_mask, offs_n,
                                  PAGE_SIZE, BLOCK_N, False, DOT_PREC)
        acc, m, l = _attend_tiles(acc, m, l, q, kv_head, table_row, full_end, last_pos + 1,
                                  last_pos, rows_pos, qk_scale, sp, so, skv, offs_d, d_mask,
                                  offs_n, PAGE_SIZE, BLOCK_N, True, DOT_PREC)
        o = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(out_ptr + tok_q[:, None] * sot + h * soh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def prefill_attention(
        q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
        cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, max_seqlen_q: int,
        scale: float | None = None, out: torch.Tensor | None = None, block_m: int = 128,
        block_n: int = 64, num_warps: int | None = None, num_stages: int = 3) -> torch.Tensor:
    """q: [T, H, D] (packed new tokens, any token/head strides); kv_layer: [P, page, 2, Hkv, D]
    (e.g. kv[:, layer]) already holding the new tokens' K/V; block_tables: [B, max_pages];
    cu_seqlens_q: [B+1] int32 offsets into T; context_lens: [B] int (prefix + q_len per
    sequence); max_seqlen_q: max q_len (host int, sizes the grid) -> out [T, H, D].

    Defaults (H100, D 64/128, bf16): 128x64 tiles, 8 warps, 3 stages (~170 registers, no
    spills, ~96 KB shared memory at D=128); block_m shrinks for short queries."""
    t, nh, d = q.shape
    _, page_size, _, nkv, dkv = kv_layer.shape
    bsz = context_lens.shape[0]
    if dkv != d or nh % nkv or block_tables.shape[0] != bsz or cu_seqlens_q.shape != (bsz + 1,):
        raise ValueError(f"shapes: q {tuple(q.shape)}, kv_layer {tuple(kv_layer.shape)}, "
                         f"block_tables {tuple(block_tables.shape)}, cu_seqlens_q "
                         f"{tuple(cu_seqlens_q.shape)}, context_lens {tuple(context_lens.shape)}")
    for name, x in (("q", q), ("kv_layer", kv_layer), ("block_tables", block_tables)):
        check_last_dim_contiguous(name, x)
    check_index_vector("cu_seqlens_q", cu_seqlens_q, bsz + 1)
    check_index_vector("context_lens", context_lens, bsz)
    out = output(out, (t, nh, d), q)
    if t == 0 or bsz == 0:
        return out
    if q.dtype == torch.float32:  # exact fp32 dots run on FMA units: small tiles, no spills
        block_m, block_n, num_stages = min(block_m, 32), min(block_n, 32), 1
        num_warps = num_warps or 8
    block_m = min(block_m, pow2(max_seqlen_q, 16))
    num_warps = num_warps or (8 if block_m >= 128 else 4)
    scale = d ** -0.5 if scale is None else scale
    grid = (triton.cdiv(max_seqlen_q, block_m), bsz, nh)
    _prefill_kernel[grid](
        q, kv_layer, block_tables, cu_seqlens_q, context_lens, out, scale * LOG2E,
        q.stride(0), q.stride(1), *kv_layer.stride()[:4], block_tables.stride(0),
        out.stride(0), out.stride(1), GROUP=nh // nkv, HEAD_DIM=d, PAGE_SIZE=page_size,
        BLOCK_M=block_m, BLOCK_D=pow2(d, 16), BLOCK_N=block_n,
        DOT_PREC=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)
    return out


def prefill_attention_ref(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                          scale: float | None = None) -> torch.Tensor:
    """Torch reference, per sequence as TorchAttention._one -> [T, H, D]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    page_size = kv_layer.shape[1]
    outs = []
    for b in range(context_lens.shape[0]):
        s, e, ctx = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(context_lens[b])
        n_pages = -(-ctx // page_size)
        g = kv_layer[block_tables[b, :n_pages].long()].flatten(0, 1)[:ctx]  # [ctx, 2, Hkv, D]
        k, v = g[:, 0].transpose(0, 1), g[:, 1].transpose(0, 1)  # [Hkv, ctx, D]
        prefix = ctx - (e - s)
        mask = torch.ones(e - s, ctx, dtype=torch.bool, device=q.device).tril(prefix)
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k, v, attn_mask=mask,
                                           scale=scale, enable_gqa=True)  # [H, q_len, D]
        outs.append(o.transpose(0, 1))
    return torch.cat(outs) if outs else q.new_empty(q.shape)
