"""Paged attention kernels against their torch references and the runtime's TorchAttention.

Pools are random with shuffled (non-contiguous) page tables; page 0 and every slot past
a sequence's context are NaN ("poison"), so a kernel that reads a padding table entry or
a token past ctx_len returns NaN (the references see the same pool with poison zeroed).
Outputs start as NaN so an unwritten element fails. CPU: TRITON_INTERPRET=1, small
shapes; CUDA: also bf16/fp16 and model-sized shapes.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

CUDA = torch.cuda.is_available()
assert CUDA or os.environ.get("TRITON_INTERPRET") == "1", "conftest must set TRITON_INTERPRET"

from pdmesh.kernels import (kv_store, paged_decode_attention,  # noqa: E402
                            paged_decode_attention_ref, prefill_attention,
                            prefill_attention_ref, slot_mapping_from)
from pdmesh.runtime.attention import AttnMetadata, SeqSpan, TorchAttention  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if CUDA else [torch.float32]
TOL = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
LAYERS, LAYER = 3, 1  # kernels get the strided view kv[:, LAYER]
# (page_size, head_dim, kv heads, block sizes for the kernels)
SMALL = dict(page_size=4, d=32, hkv=2, blocks=dict(block_n=16))
BIG = dict(page_size=16, d=128, hkv=8, blocks={})


@pytest.fixture
def seed():
    s = random.randrange(2 ** 31)
    torch.manual_seed(s)
    return s


def paged_pool(ctx_lens, page_size, hkv, d, dtype):
    """-> (kv poisoned [P, L, page, 2, Hkv, D], kv clean, tables [B, width] int32 shuffled).

    Page 0 is all NaN and pads every table row (one extra column); slots past ctx are NaN."""
    n_pages = [-(-c // page_size) for c in ctx_lens]
    pool = sum(n_pages) + 3
    kv = torch.randn(pool, LAYERS, page_size, 2, hkv, d, device=DEV).to(dtype)
    perm = (torch.randperm(pool - 1) + 1).tolist()  # page 0 stays the poison page
    tables = torch.zeros(len(ctx_lens), max(n_pages) + 1, dtype=torch.int32)
    clean = kv.clone()
    kv[0] = float("nan")
    clean[0] = 0
    for b, (c, n) in enumerate(zip(ctx_lens, n_pages)):
        tables[b, :n] = torch.tensor(perm[:n])
        perm = perm[n:]
        last, used = int(tables[b, n - 1]), c - (n - 1) * page_size
        kv[last, :, used:] = float("nan")
        clean[last, :, used:] = 0
    return kv, clean, tables.to(DEV)


def close(got, want, dtype, seed, what=""):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what} (seed {seed}): {m}")


DECODE_CASES = [(SMALL, [1, 5, 8, 13, 31, 64])]
if CUDA:
    DECODE_CASES += [(BIG, [1, 17, 512, 1000, 4096, 33]), (dict(BIG, d=64, hkv=2), [2049, 7])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("num_splits", [1, 4, None])
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_paged_decode_attention(dtype, group, num_splits, case, seed):
    shape, lens = DECODE_CASES[case]
    hkv, d = shape["hkv"], shape["d"]
    kv, clean, tables = paged_pool(lens, shape["page_size"], hkv, d, dtype)
    b, h = len(lens), group * hkv
    q = torch.randn(b, 2 * h, d, device=DEV).to(dtype)[:, ::2]  # a strided q
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    out = paged_decode_attention(q, kv[:, LAYER], tables, ctx, num_splits=num_splits,
                                 out=torch.full((b, h, d), float("nan"), dtype=dtype, device=DEV),
                                 **shape["blocks"])
    want = paged_decode_attention_ref(q.float(), clean[:, LAYER].float(), tables, ctx)
    close(out, want, dtype, seed, f"splits={num_splits}")


def test_decode_split_k_really_splits():
    """The split-K path is taken (several partials merged), and matches one split."""
    kv, clean, tables = paged_pool([64, 3], 4, 2, 32, torch.float32)
    q = torch.randn(2, 4, 32, device=DEV)
    ctx = torch.tensor([64, 3], dtype=torch.int32, device=DEV)
    one = paged_decode_attention(q, kv[:, LAYER], tables, ctx, num_splits=1, block_n=16)
    many = paged_decode_attention(q, kv[:, LAYER], tables, ctx, num_splits=5, block_n=16)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)
    auto = paged_decode_attention(q, kv[:, LAYER], tables, ctx, min_split_tokens=16)  # defaults
    torch.testing.assert_close(one, auto, atol=1e-5, rtol=1e-5)
    from pdmesh.kernels import choose_num_splits
    assert choose_num_splits(1, 8, 4096, 64) > 1 and choose_num_splits(64, 8, 512, 64) == 1


def test_decode_zero_context_gives_zeros():
    """A CUDA-graph padding row (ctx 0) must not produce NaN or read anything."""
    kv, _, tables = paged_pool([5, 1], 4, 2, 32, torch.float32)
    ctx = torch.tensor([5, 0], dtype=torch.int32, device=DEV)
    for splits in (1, 2):
        out = paged_decode_attention(torch.randn(2, 2, 32, device=DEV), kv[:, LAYER], tables,
                                     ctx, num_splits=splits, block_n=16)
        assert torch.equal(out[1], torch.zeros_like(out[1])) and not out[0].isnan().any()


PREFILL_CASES = {  # (cached prefix, new tokens) per sequence
    "no_prefix": (SMALL, [(0, 1), (0, 7), (0, 20), (0, 33)]),
    "prefix": (SMALL, [(5, 1), (3, 7), (16, 20), (0, 9), (9, 33)]),
}
if CUDA:
    PREFILL_CASES["big_no_prefix"] = (BIG, [(0, 300), (0, 1), (0, 1024), (0, 77)])
    PREFILL_CASES["big_prefix"] = (BIG, [(128, 513), (1000, 1), (77, 1024), (0, 64)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_attention(dtype, group, case, seed):
    shape, seqs = PREFILL_CASES[case]
    hkv, d = shape["hkv"], shape["d"]
    lens = [p + n for p, n in seqs]
    kv, clean, tables = paged_pool(lens, shape["page_size"], hkv, d, dtype)
    q_lens = torch.tensor([n for _, n in seqs])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)]).to(torch.int32).to(DEV)
    t, h = int(q_lens.sum()), group * hkv
    q = torch.randn(t, h, d, device=DEV).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    blocks = dict(shape["blocks"], **({"block_m": 16} if shape is SMALL else {}))
    out = prefill_attention(q, kv[:, LAYER], tables, cu, ctx, int(q_lens.max()),
                            out=torch.full((t, h, d), float("nan"), dtype=dtype, device=DEV),
                            **blocks)
    want = prefill_attention_ref(q.float(), clean[:, LAYER].float(), tables, cu, ctx)
    close(out, want, dtype, seed, case)


@pytest.mark.parametrize("decode", [False, True])
def test_store_then_attention_equals_runtime(decode, seed):
    """kv_store + the attention kernels reproduce TorchAttention.store + forward (the CPU
    runtime path) on the same AttnMetadata, int64 page tables included."""
    page_size, hkv, h, d = 4, 2, 4, 32
    seqs = [(6, 1), (0, 1), (12, 1)] if decode else [(0, 5), (6, 3), (2, 1)]
    lens = [p + n for p, n in seqs]
    kv, _, tables = paged_pool(lens, page_size, hkv, d, torch.float32)
    kv = kv.nan_to_num(0.0)
    spans, q0 = [], 0
    for b, ((p, n), c) in enumerate(zip(seqs, lens)):
        spans.append(SeqSpan(q0, n, c, tables[b, : -(-c // page_size)].long().cpu()))
        q0 += n
    meta = AttnMetadata.build(spans, page_size, DEV)
    q, k, v = (torch.randn(q0, n, d, device=DEV) for n in (h, hkv, hkv))
    want_kv = kv.clone()
    torch_attn = TorchAttention(h, hkv, d)
    torch_attn.store(want_kv[:, LAYER], k, v, meta)
    want = torch_attn.forward(q, want_kv[:, LAYER], meta)
    kv_store(k, v, kv[:, LAYER], slot_mapping_from(meta.store_pages, meta.store_offsets, page_size))
    assert torch.equal(kv, want_kv), f"seed {seed}"
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    if decode:
        got = paged_decode_attention(q, kv[:, LAYER], meta.decode_table, ctx, block_n=16)
    else:
        cu = torch.tensor([0] + [s.q_start + s.q_len for s in spans], dtype=torch.int32,
                          device=DEV)
        got = prefill_attention(q, kv[:, LAYER], tables.long(), cu, ctx, 5, block_m=16,
                                block_n=16)
    close(got, want, torch.float32, seed)


def test_bad_inputs_raise_clear_errors():
    kv, _, tables = paged_pool([5, 9], 4, 2, 32, torch.float32)
    q = torch.randn(2, 4, 32, device=DEV)
    ctx = torch.tensor([5, 9], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="shapes"):
        paged_decode_attention(q[:, :3], kv[:, 0], tables, ctx)  # 3 heads over 2 kv heads
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode_attention(q, kv[:, 0], tables, torch.stack([ctx, ctx], 1)[:, 0])
    with pytest.raises(ValueError, match="out"):
        paged_decode_attention(q, kv[:, 0], tables, ctx, out=torch.empty(2, 4, 16, device=DEV))
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        prefill_attention(q, kv[:, 0], tables, cu[:2], ctx, 1)  # B + 1 offsets needed
    with pytest.raises(ValueError, match="slot_mapping"):
        kv_store(q[:, :2], q[:, :2], kv[:, 0], torch.zeros(3, dtype=torch.long, device=DEV))


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_decode_attention_replays_in_a_cuda_graph(seed):
    """Captured once (split-K on, partial buffers from the graph pool), replayed with new
    queries, page tables and context lengths written into the same tensors."""
    hkv, h, d = 8, 32, 128
    kv, clean, tables = paged_pool([4000] * 4, 16, hkv, d, torch.bfloat16)
    q = torch.randn(4, h, d, device=DEV, dtype=torch.bfloat16)
    ctx = torch.full((4,), 4000, dtype=torch.int32, device=DEV)
    out = torch.empty_like(q)
    paged_decode_attention(q, kv[:, LAYER], tables, ctx, out=out)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(q, kv[:, LAYER], tables, ctx, out=out)
    for _ in range(3):
        q.copy_(torch.randn_like(q))
        ctx.copy_(torch.randint(1, 4001, (4,), device=DEV, dtype=torch.int32))
        tables.copy_(tables[torch.randperm(4, device=DEV)])
        graph.replay()
        want = paged_decode_attention_ref(q.float(), clean[:, LAYER].float(), tables, ctx)
        close(out, want, torch.bfloat16, seed, f"graph replay, ctx {ctx.tolist()}")
