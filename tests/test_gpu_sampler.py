"""The vectorised GPU sampler (pdmesh.runtime.gpu_sampler). It is plain torch, so its
semantics are checked here on CPU tensors against sampler.py and exact probabilities;
on CUDA, sampler.sample routes unseeded rows without logprobs to it."""
from __future__ import annotations

import math

import pytest
import torch

from pdmesh.runtime.gpu_sampler import handles, sample_gpu
from pdmesh.runtime.sampler import SamplingRow, make_generator, sample
from pdmesh.runtime.sampling_params import SamplingParams

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def row(prompt=(5, 6), output=(7,), banned=(), **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), list(prompt), list(output), None, tuple(banned))


def test_handles_only_unseeded_rows_without_logprobs():
    assert handles([row(temperature=0.5)])
    assert not handles([row(logprobs=1)])
    seeded = SamplingRow(SamplingParams(seed=3), [1], [], make_generator(3, "cpu"))
    assert not handles([row(), seeded])


def test_greedy_with_penalties_matches_reference():
    torch.manual_seed(0)
    logits = torch.randn(5, 50, device=DEV)
    logits[:, 5:8] += 3  # the penalised ids lead before the penalty
    kinds = [dict(repetition_penalty=2.0), dict(frequency_penalty=2.0),
             dict(presence_penalty=2.0), dict(repetition_penalty=0.5, presence_penalty=1.0),
             dict()]
    rows = [row(prompt=(5, 6), output=(7, 7, 9), temperature=0, **k) for k in kinds]
    before = logits.clone()
    want = [t.token_id for t in sample(logits.cpu(), rows)]  # reference path (CPU)
    assert [t.token_id for t in sample_gpu(logits, rows)] == want
    assert torch.equal(logits, before)  # the caller's logits are not modified
    assert want[:4] != logits.argmax(-1).tolist()[:4]  # the penalties changed choices


def test_min_tokens_masks_banned_ids():
    logits = torch.zeros(2, 10, device=DEV)
    logits[:, 2] = 10.0  # "eos" is by far the most likely
    logits[:, 4] = 5.0  # the runner-up
    rows = [row(output=(), banned=(2,), temperature=0, min_tokens=1),  # masked: too short
            row(output=(1,), banned=(2,), temperature=0, min_tokens=1)]  # long enough
    assert [t.token_id for t in sample_gpu(logits, rows)] == [4, 2]


def _freqs(logits: torch.Tensor, n: int, **kw) -> torch.Tensor:
    got = sample_gpu(logits.expand(n, -1), [row(**kw)] * n)
    return torch.bincount(torch.tensor([t.token_id for t in got]), minlength=logits.shape[-1]) / n


def _expected(logits: torch.Tensor, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0):
    x = logits[0].double().cpu() / temperature
    vals, order = x.sort(descending=True)
    if top_k > 0:
        vals[top_k:] = -math.inf
    p = torch.softmax(vals, 0)
    keep = (p.cumsum(0) - p) < top_p
    vals[~keep] = -math.inf
    if min_p > 0:
        vals[vals < vals[0] + math.log(min_p)] = -math.inf
    out = torch.zeros_like(x)
    out[order] = torch.softmax(vals, 0)
    return out


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(temperature=1.0, top_k=3),
                                dict(temperature=1.3, top_p=0.8),
                                dict(temperature=1.0, top_k=4, top_p=0.9, min_p=0.2)])
def test_sampled_distribution(kw):
    torch.manual_seed(1)
    logits = torch.tensor([[2.0, 1.5, 0.3, -0.5, 1.0, 0.0]], device=DEV)
    got, want = _freqs(logits, 40000, **kw), _expected(logits, **kw)
    assert (got.cpu().double() - want).abs().max() < 0.015, (got, want)
    assert (got.cpu()[want == 0] == 0).all()  # filtered tokens are never drawn


def test_mixed_batch_one_call():
    torch.manual_seed(2)
    logits = torch.randn(4, 100, device=DEV) * 4
    rows = [row(temperature=0), row(temperature=1.0, top_k=1), row(temperature=2.0, top_p=1e-3),
            row(temperature=0.5, top_k=5, repetition_penalty=1.3)]
    got = [t.token_id for t in sample_gpu(logits, rows)]
    best = logits.argmax(-1).tolist()
    assert got[:3] == best[:3]
    assert got[3] in logits[3].topk(6).indices.tolist()
