"""The host side of prefill CUDA graphs (pdmesh/runtime/prefill_graph.py), without a GPU:
buckets, the bucket a batch takes, and the static buffers a step fills, checked against
the eager path's metadata (triton_backend.build_metadata) for the same spans. The graphs
themselves are checked against eager prefill on CUDA in tests/test_gpu_runtime.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pdmesh.config import EngineConfig
from pdmesh.runtime.attention import SeqSpan
from pdmesh.runtime.prefill_graph import fill_prefill_rows, pick_bucket, prefill_buckets
from pdmesh.runtime.triton_backend import build_metadata

PAGE = 16


def test_buckets_stop_at_the_prefill_budget():
    tokens = EngineConfig().cuda_graph_prefill_tokens
    assert prefill_buckets(tokens, 4096, 64) == [(16, 16), (32, 32), (64, 64), (128, 64),
                                                 (256, 64), (512, 64), (1024, 64),
                                                 (2048, 64), (4096, 64)]
    # a budget between sizes keeps the size that covers it; nothing above
    assert prefill_buckets(tokens, 300, 8)[-2:] == [(256, 8), (512, 8)]
    assert prefill_buckets((), 4096, 64) == []


@pytest.mark.parametrize("tokens,seqs,want", [
    (1, 1, (16, 16)), (16, 1, (16, 16)), (17, 1, (32, 32)), (280, 1, (512, 64)),
    (100, 40, (128, 64)), (4096, 64, (4096, 64)), (4097, 1, None), (200, 65, None),
    (20, 20, (32, 32)), (20, 33, (64, 64))])
def test_pick_bucket(tokens, seqs, want):
    buckets = prefill_buckets(EngineConfig().cuda_graph_prefill_tokens, 4096, 64)
    assert pick_bucket(buckets, tokens, seqs) == want


def _spans():
    """Three sequences: a fresh 20-token prompt, a 5-token chunk after a 30-token cached
    prefix, a single token after 47 (as a decode row would be)."""
    lens = [(20, 20), (5, 35), (1, 48)]  # (q_len, ctx_len)
    spans, q, page = [], 0, 3
    for q_len, ctx in lens:
        n = -(-ctx // PAGE)
        table = torch.arange(page, page + 2 * n, 2)  # scattered pages
        spans.append(SeqSpan(q, q_len, ctx, table))
        q += q_len
        page += 2 * n + 1
    return spans


def test_fill_matches_the_eager_metadata():
    spans = _spans()
    t, n = sum(s.q_len for s in spans), len(spans)
    ids = list(range(100, 100 + t))
    pos = np.concatenate([np.arange(s.ctx_len - s.q_len, s.ctx_len) for s in spans])
    last = [19, 24, 25]
    t_pad, b_pad, width = 32, 8, 6
    ints = np.full((3, 64), 7, dtype=np.int64)  # stale contents everywhere
    seqs = np.full((2, 17), 7, dtype=np.int32)
    table = np.full((16, width), 7, dtype=np.int32)
    rows = np.full(16, 7, dtype=np.int64)
    fill_prefill_rows(ints, seqs, table, rows, ids, pos, spans, last, PAGE, t_pad, b_pad)
    ref = build_metadata(spans, PAGE, "cpu")
    assert ints[0, :t].tolist() == ids and ints[1, :t].tolist() == pos.tolist()
    assert ints[2, :t].tolist() == ref.slot_mapping.tolist()
    assert (ints[2, t:t_pad] == -1).all() and (ints[:2, t:t_pad] == 0).all()
    assert seqs[0, : n + 1].tolist() == ref.q_start.tolist()
    assert (seqs[0, n + 1: b_pad + 1] == t).all()  # padding sequences: q_len 0
    assert seqs[1, :n].tolist() == ref.ctx_lens.tolist() and (seqs[1, n:b_pad] == 0).all()
    for i, s in enumerate(spans):
        assert table[i, : len(s.table)].tolist() == s.table.tolist()
    assert rows[:3].tolist() == last and (rows[3:b_pad] == 0).all()
    assert (ints[:, t_pad:] == 7).all() and (rows[b_pad:] == 7).all()  # beyond: untouched


def test_env_turns_prefill_graphs_off_or_resizes_them():
    from pdmesh.config import engine_config_from_env

    off = engine_config_from_env(env={"PDMESH_CUDA_GRAPH_PREFILL_TOKENS": ""})
    assert off.cuda_graph_prefill_tokens == ()
    two = engine_config_from_env(env={"PDMESH_CUDA_GRAPH_PREFILL_TOKENS": "256,1024"})
    assert two.cuda_graph_prefill_tokens == (256, 1024)
    with pytest.raises(ValueError, match="cuda_graph_prefill_tokens"):
        EngineConfig(cuda_graph_prefill_tokens=(0,))


def test_torch_metadata_puts_the_page_tables_on_the_pools_device():
    """AttnMetadata.build moves each span's page table to the forward's device once
    (gather_pages' index_select needs it there: the torch backend on CUDA, e.g.
    numerics="reference"); host spans on a host forward are kept as they are."""
    from pdmesh.runtime.attention import AttnMetadata

    spans = _spans()
    meta = AttnMetadata.build(spans, PAGE, "meta")  # a device other than the host's
    assert [s.table.device.type for s in meta.seqs] == ["meta"] * len(spans)
    assert [(s.q_start, s.q_len, s.ctx_len) for s in meta.seqs] == \
        [(s.q_start, s.q_len, s.ctx_len) for s in spans]
    host = AttnMetadata.build(spans, PAGE, "cpu")
    assert all(a is b for a, b in zip(host.seqs, spans))
