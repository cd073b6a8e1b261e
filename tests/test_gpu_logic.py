"""CPU-runnable checks of the GPU runtime's logic: graph batch-size padding, the triton
backend's metadata, backend selection, config knobs, and the whole fused/triton forward
(under TRITON_INTERPRET=1, set by conftest) against the torch path on a tiny model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pdmesh import Engine, SamplingParams
from pdmesh.config import EngineConfig, engine_config_from_env
from pdmesh.runtime.attention import SeqSpan, resolve_attention_backend
from pdmesh.runtime.cuda_graph import fill_decode_rows, graph_batch_sizes, pick_batch_size
from pdmesh.runtime.loader import load_model
from pdmesh.runtime.triton_backend import build_metadata, host_decode_arrays
from tiny_models import write_tiny_hf_model


def test_graph_batch_sizes_capped_and_sorted():
    assert graph_batch_sizes((16, 1, 8, 2, 4), 64) == [1, 2, 4, 8, 16]
    assert graph_batch_sizes((1, 2, 4, 8, 16, 32, 64), 20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes((1, 8), 8) == [1, 8]
    assert graph_batch_sizes((4,), 2) == [2]


@pytest.mark.parametrize("n,want", [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8), (9, 16),
                                    (16, 16), (17, None)])
def test_pick_batch_size_pads_up(n, want):
    assert pick_batch_size(n, [1, 2, 4, 8, 16]) == want


def test_host_decode_arrays():
    spans = [SeqSpan(0, 1, 5, torch.tensor([7, 3])), SeqSpan(1, 1, 1, torch.tensor([9]))]
    ints, table = host_decode_arrays(spans, page_size=4)
    # seq 0: position 4 -> page 3 (second page), offset 0 -> slot 12; seq 1: slot 36
    assert ints.tolist() == [[12, 36], [5, 1], [4, 0]]
    assert table.dtype == torch.int32 and table.tolist() == [[7, 3], [9, 0]]


def test_fill_decode_rows_pads():
    ints = np.full((4, 4), 99, dtype=np.int64)
    table = np.full((4, 3), 77, dtype=np.int32)
    fill_decode_rows(ints, table, [11, 12], [[7, 3, 5], [9]], [5, 1], page_size=4, pad_to=3)
    assert ints[:, :3].tolist() == [[12, 36, -1], [5, 1, 0], [4, 0, 0], [11, 12, 0]]
    assert ints[:, 3].tolist() == [99] * 4  # past pad_to: untouched
    assert table[0, :2].tolist() == [7, 3] and table[1, 0] == 9


def test_prefill_metadata():
    spans = [SeqSpan(0, 3, 5, torch.tensor([2, 6])), SeqSpan(3, 2, 2, torch.tensor([1]))]
    m = build_metadata(spans, 4, "cpu")
    assert not m.decode and m.max_q_len == 3
    # seq 0 new tokens at positions 2, 3 (page 2), 4 (page 6, offset 0); seq 1 at 0, 1 of page 1
    assert m.slot_mapping.tolist() == [10, 11, 24, 4, 5]
    assert m.q_start.tolist() == [0, 3, 5] and m.ctx_lens.tolist() == [5, 2]
    assert m.block_table.tolist() == [[2, 6], [1, 0]]
    d = build_metadata([SeqSpan(0, 1, 5, torch.tensor([2, 6]))], 4, "cpu")
    assert d.decode and d.slot_mapping.tolist() == [24] and d.ctx_lens.tolist() == [5]


def test_backend_selection():
    # "auto" on CPU ("cpu" where the C++ kernel builds): tests/test_cpu_attention.py
    assert resolve_attention_backend("triton", "cpu") == "triton"
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_attention_backend("flash", "cpu")


def test_config_knobs():
    cfg = engine_config_from_env(env={"PDMESH_CUDA_GRAPHS": "off",
                                      "PDMESH_CUDA_GRAPH_BATCH_SIZES": "1,4, 16",
                                      "PDMESH_ATTENTION_BACKEND": "torch"})
    assert (cfg.cuda_graphs, cfg.cuda_graph_batch_sizes, cfg.attention_backend) == \
        (False, (1, 4, 16), "torch")
    with pytest.raises(ValueError, match="PDMESH_CUDA_GRAPHS"):
        engine_config_from_env(env={"PDMESH_CUDA_GRAPHS": "maybe"})
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash")
    with pytest.raises(ValueError, match="cuda_graph_batch_sizes"):
        EngineConfig(cuda_graph_batch_sizes=(0, 4))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    write_tiny_hf_model(folder, "llama", seed=3)
    return load_model(folder)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="CPU-only (interpreted Triton); GPUs run tests/test_gpu_runtime.py")
def test_triton_backend_equals_torch_on_cpu(tiny):
    """The fused forward + Triton kernels (interpreted) give the torch path's tokens and
    logprobs, over batched, chunked and paged prefill and batched decode."""
    prompts = [[5 + i, 17, 300 + i] * (2 + 3 * i) for i in range(3)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    out = {}
    for be in ("torch", "triton"):
        e = Engine(loaded=tiny, attention_backend=be, page_size=4, num_pages=64,
                   chunked_prefill_size=8, max_prefill_tokens=12)
        assert e.runner.backend == be and (e.runner.fused is not None) == (be == "triton")
        assert e.runner.graphs is None  # CUDA graphs only on CUDA
        # 3 prompts decode 3 rows a step (fused GEMVs, tensor-core form); the 4th run
        # alone decodes one row (the CUDA-core form)
        out[be] = e.generate(prompt_token_ids=prompts, params=params) + \
            e.generate(prompt_token_ids=prompts[2], params=params)
    for a, b in zip(out["torch"], out["triton"]):
        assert a.token_ids == b.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter check; GPUs tune it live")
@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (3, 64, 300), (4, 9, 1030), (16, 17, 128)])
def test_skinny_linear_matches_f_linear(m, n, k):
    from pdmesh.runtime.triton_linear import CONFIGS, skinny_linear

    x, w = torch.randn(m, k), torch.randn(n, k)
    for cfg in (CONFIGS[0], CONFIGS[1], CONFIGS[5], CONFIGS[7]):
        if cfg[0] == "gemv" and m > 4:
            with pytest.raises(ValueError, match="at most 4 rows"):
                skinny_linear(x, w, cfg)
            continue
        torch.testing.assert_close(skinny_linear(x, w, cfg), torch.nn.functional.linear(x, w),
                                   rtol=1e-4, atol=1e-4)
