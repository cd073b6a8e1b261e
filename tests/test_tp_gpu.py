"""Tensor parallelism on two GPUs (NCCL; skipped without two): rank r on cuda:r, the
Triton attention backend, decode steps replayed from CUDA graphs with the all-reduces
inside. Greedy output at TP 2 equals TP 1 (float32: only the all-reduce's summation order
differs), eager and graphed; a worker's rank group maps rank 1's GPU pool by CUDA IPC and
its Engine's greedy output equals TP 1's."""
from __future__ import annotations

import pytest
import torch

from pdmesh import Engine, SamplingParams
from pdmesh.runtime.tp.launch import generate
from test_tp import TINY_PROMPTS, tiny_loaded, tiny_model

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_model):
    folder = tmp_path_factory.mktemp("tiny_tp_gpu")
    tiny_model(folder, "llama", default_model, seed=5)
    return folder, tiny_loaded(folder, default_model.tokenizer)


def test_tp2_on_two_gpus_equals_tp1_eager_and_graphed(tiny):
    folder = str(tiny[0])
    want = generate(folder, TINY_PROMPTS, 12, tp=1, device="cuda")
    assert generate(folder, TINY_PROMPTS, 12, tp=2, device="cuda") == want
    assert generate(folder, TINY_PROMPTS, 12, tp=2, device="cuda",
                    graph_sizes=(1, 2, 4)) == want
    assert all(len(t) == 12 for t in want)


def test_worker_rank_group_on_two_gpus_equals_tp1(tiny):
    from pdmesh.runtime.tp.ranks import RankGroup

    folder, loaded = tiny

    def engine() -> Engine:
        return Engine(model=str(folder), loaded=loaded, dtype="float32", device="cuda",
                      page_size=16, num_pages=64, cuda_graph_batch_sizes=(1, 2, 4))

    # TP 1 through the same kernels (the engine alone's fused path may round otherwise)
    want = [t[:8] for t in generate(str(folder), TINY_PROMPTS, 8, tp=1, device="cuda")]
    eng = engine()
    g = RankGroup.attach(eng, 2)
    try:
        assert g.runner.graphs is not None and g.runner.backend == "triton"
        got = [o.token_ids for o in eng.generate(prompt_token_ids=TINY_PROMPTS, params=PARAMS)]
        assert got == want
        # rank 1's pool lives on GPU 1, mapped here by CUDA IPC, and was written
        assert g.pools[1].device == torch.device("cuda", 1)
        assert [p.shape[4] for p in g.pools] == [1, 1]
        assert all(bool(p.float().abs().sum() > 0) for p in g.pools)
    finally:
        g.close()
