"""The prefill warm-up (pdmesh/runtime/warmup.py) runs every shape through the fused path
and leaves no trace: the pages it wrote garbage into serve later requests exactly as
fresh ones. On CPU under interpreted Triton with a tiny model (the GPU runs it at start)."""
from __future__ import annotations

import pytest
import torch

from pdmesh import Engine, SamplingParams
from pdmesh.runtime.loader import load_model
from pdmesh.runtime.warmup import SHAPES, warm_prefill
from tiny_models import write_tiny_hf_model

SMALL = ((1, 0),), ((5, 0), (4, 0)), ((3, 4), (6, 8)), ((9, 0), (2, 0), (4, 0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-warm")
    write_tiny_hf_model(folder, "llama", seed=5)
    return load_model(folder)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter check")
def test_warm_up_leaves_outputs_unchanged(tiny):
    prompts = [[5 + i, 17, 300 + i] * (2 + i) for i in range(3)]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=0)
    out = []
    for warm in (False, True):
        e = Engine(loaded=tiny, attention_backend="triton", page_size=4, num_pages=64)
        if warm:
            assert warm_prefill(e.runner, SMALL) > 0
            assert e.runner.kv.abs().sum() > 0  # it did write into the pool
        out.append(e.generate(prompt_token_ids=prompts, params=params))
    for a, b in zip(*out):
        assert a.token_ids == b.token_ids
        assert [x.logprob for x in a.logprobs] == pytest.approx([x.logprob for x in b.logprobs],
                                                                abs=1e-5)


def test_shapes_cover_the_specialisations():
    """Totals of 1, odd and multiples of 16 tokens; 1, 2..16 and 17 sequences; prefixes."""
    totals = {sum(q for q, _ in s) for s in SHAPES}
    counts = {len(s) for s in SHAPES}
    assert 1 in totals and any(t % 16 == 0 for t in totals) and any(t % 16 for t in totals)
    assert {1, 2, 16, 17} <= counts
    assert any(c for s in SHAPES for _, c in s) and max(q for s in SHAPES for q, _ in s) > 1024
