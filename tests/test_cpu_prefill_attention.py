"""bf16 prefill through the CPU attention kernel (cpu_attention.CpuPagedAttention): each
query row a sequence of its own over the pages, against an fp32 reference, for whole
prompts, a prompt continued after a cached prefix, several prompts in one step and a
mixed step, on 1 and 2 threads (rows reordered to balance them); fp32 and too-wide
tables keep the torch path."""
from __future__ import annotations

import pytest
import torch

from pdmesh.runtime import cpu_attention as ca
from pdmesh.runtime.attention import SeqSpan, TorchAttention

H, HKV, D, PAGE, POOL = 9, 3, 64, 16, 96


def _step(spans_spec, dtype, seed=0):
    """spans_spec: [(q_len, ctx_len)]; KV of every context token in the pool (disjoint
    random pages). Returns q [T, H, D], the pool layer, spans."""
    g = torch.Generator().manual_seed(seed)
    layer = torch.randn(POOL, PAGE, 2, HKV, D, generator=g).to(dtype)
    free = torch.randperm(POOL, generator=g).tolist()
    spans, start = [], 0
    for q_len, ctx in spans_spec:
        table = torch.tensor([free.pop() for _ in range(-(-ctx // PAGE))])
        spans.append(SeqSpan(start, q_len, ctx, table))
        start += q_len
    q = torch.randn(start, H + 2 * HKV, D, generator=g).to(dtype)[:, :H]  # a strided view
    return q, layer, spans


def _reference(q, layer, spans):
    """fp32: each query row over the keys at or before its position."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for s in spans:
        rows = q[s.q_start: s.q_start + s.q_len].float()
        lens = torch.arange(s.ctx_len - s.q_len + 1, s.ctx_len + 1)
        table = s.table[None].expand(s.q_len, -1).contiguous()
        out[s.q_start: s.q_start + s.q_len] = ca.paged_decode_attention_ref(
            rows, layer.float(), table, lens, D ** -0.5)
    return out


@pytest.mark.parametrize("spec", [
    [(256, 256)],                      # one whole prompt
    [(256, 256), (256, 256)],          # the CPU default budget: two prompts a step
    [(40, 100), (7, 7), (1, 33)],      # continued after a prefix, short, a decode row
])
@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_rows_match_fp32_reference(spec, threads):
    assert ca.available()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, layer, spans = _step(spec, torch.bfloat16)
        attn = ca.CpuPagedAttention(H, HKV, D)
        meta = attn.build_metadata(spans, PAGE)
        assert meta.rows_lens is not None and meta.kernel_lens is None
        assert (meta.rows_order is not None) == (threads > 1)
        got = attn.forward(q, layer, meta)
    finally:
        torch.set_num_threads(before)
    want = _reference(q, layer, spans)
    err = (got.float() - want).abs()
    assert err.max() <= 1e-2  # one bf16 rounding of outputs of magnitude < 2
    eager = TorchAttention(H, HKV, D).forward(q, layer, TorchAttention.build_metadata(spans, PAGE))
    assert err.mean() <= (eager.float() - want).abs().mean()  # no worse than the torch path


def test_fp32_and_wide_tables_keep_the_torch_path(monkeypatch):
    q, layer, spans = _step([(64, 64)], torch.float32)
    attn = ca.CpuPagedAttention(H, HKV, D)
    meta = attn.build_metadata(spans, PAGE)
    calls = []
    monkeypatch.setattr(ca, "paged_decode_attention", lambda *a, **k: calls.append(1))
    out = attn.forward(q, layer, meta)
    assert calls == [] and torch.allclose(out, _reference(q, layer, spans), atol=2e-5)
    monkeypatch.setattr(ca, "MAX_ROW_TABLE", 64 * 4 - 1)  # 64 rows x 4 pages: too wide
    assert attn.build_metadata(spans, PAGE).rows_lens is None
