"""Sampler and SamplingParams: greedy, temperature, top-k/top-p/min-p, seeds, penalties,
min_tokens masking, logprobs, validation."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pdmesh.runtime.sampler as sampler_mod
from pdmesh.runtime.sampler import SampledToken, SamplingRow, apply_penalties, make_generator, sample
from pdmesh.runtime.sampling_params import SamplingParams

V = 32


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """These tensors are tiny: intra-op threads only add wake-up latency (which is
    pathological on small VMs with the default OpenMP wait policy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def row(params: SamplingParams | None = None, prompt=(), output=(), banned=(), seed=None) -> SamplingRow:
    params = params or SamplingParams(temperature=0.0)
    seed = params.seed if seed is None else seed
    return SamplingRow(params, list(prompt), list(output), make_generator(seed), tuple(banned))


def draws(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> Counter:
    """n tokens sampled from one [V] row with a seeded generator."""
    r = row(params, seed=seed)
    return Counter(sample(logits_row[None], [r])[0].token_id for _ in range(n))


def from_probs(probs: list[float], perm: list[int] | None = None) -> torch.Tensor:
    """[V'] logits whose softmax is `probs`, optionally placed at positions perm[i]."""
    lg = torch.tensor(probs).log()
    if perm is None:
        return lg
    out = torch.empty_like(lg)
    out[torch.tensor(perm)] = lg
    return out


# --- greedy ------------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(b=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_greedy_is_argmax(b, seed):
    logits = torch.randn(b, V, generator=torch.Generator().manual_seed(seed))
    out = sample(logits, [row() for _ in range(b)])
    assert [t.token_id for t in out] == logits.argmax(-1).tolist()
    assert all(t.logprob is None and t.top_logprobs is None for t in out)


def test_greedy_fast_path_skips_row_processing(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("per-row processing on the all-greedy fast path")
    monkeypatch.setattr(sampler_mod, "_process", boom)
    logits = torch.randn(64, V)
    out = sample(logits, [row() for _ in range(64)])
    assert [t.token_id for t in out] == logits.argmax(-1).tolist()


def test_sample_does_not_modify_caller_logits():
    logits = torch.randn(3, V)
    before = logits.clone()
    rows = [row(SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, seed=1)),
            row(SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=1.0),
                prompt=[1, 2], output=[3, 3]),
            row(SamplingParams(min_tokens=3, logprobs=2), output=[1], banned=[0, 4])]
    sample(logits, rows)
    assert torch.equal(logits, before)


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError):
        sample(torch.randn(2, V), [row()])


# --- temperature / top-k / top-p / min-p -------------------------------------------------

def test_tiny_temperature_behaves_greedy():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(3))
    c = draws(logits, SamplingParams(temperature=1e-3), 200)
    assert set(c) == {int(logits.argmax())}


def test_temperature_shapes_distribution():
    # T=2 on logits log([.6,.3,.1]) gives probs proportional to sqrt(p)
    probs = [0.6, 0.3, 0.1]
    n = 6000
    c = draws(from_probs(probs), SamplingParams(temperature=2.0), n)
    expected = torch.tensor(probs).sqrt()
    expected = (expected / expected.sum()).tolist()
    for tok, p in enumerate(expected):
        assert abs(c[tok] / n - p) < 0.03, (c, expected)


def test_top_k_1_is_argmax():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(4))
    c = draws(logits, SamplingParams(temperature=1.5, top_k=1), 200)
    assert set(c) == {int(logits.argmax())}


def test_top_k_keeps_only_k_best():
    perm = [7, 2, 9, 0, 5]
    lg = torch.full((12,), -math.inf)
    lg[torch.tensor(perm)] = from_probs([0.3, 0.25, 0.2, 0.15, 0.1])
    c = draws(lg, SamplingParams(top_k=3), 3000)
    assert set(c) == {7, 2, 9}


@pytest.mark.parametrize("top_p,nucleus", [(0.7, {0, 1}), (0.85, {0, 1, 2}), (0.4, {0}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_smallest_set_reaching_p(top_p, nucleus):
    probs = [0.5, 0.3, 0.15, 0.05]
    perm = [3, 0, 6, 1]  # tokens not in vocab order, to exercise the sort/scatter
    lg = torch.full((8,), -math.inf)
    lg[torch.tensor(perm)] = from_probs(probs)
    c = draws(lg, SamplingParams(top_p=top_p), 4000)
    assert set(c) == {perm[i] for i in nucleus}


def test_top_k_then_top_p_uses_renormalised_mass():
    # top_k=3 renormalises to ~[.526, .316, .158]: mass before token 2 is .842 >= .8
    c = draws(from_probs([0.5, 0.3, 0.15, 0.05]), SamplingParams(top_k=3, top_p=0.8), 3000)
    assert set(c) == {0, 1}


@pytest.mark.parametrize("min_p,kept", [(0.25, {0, 1, 2}), (0.5, {0, 1}), (0.0, {0, 1, 2, 3}), (1.0, {0})])
def test_min_p_filters_relative_to_max(min_p, kept):
    c = draws(from_probs([0.5, 0.3, 0.15, 0.05]), SamplingParams(min_p=min_p), 4000)
    assert set(c) == kept


def test_min_p_after_top_k():
    c = draws(from_probs([0.4, 0.3, 0.2, 0.1]), SamplingParams(top_k=3, min_p=0.6), 3000)
    assert set(c) == {0, 1}


@pytest.mark.parametrize("top_k", [-1, 3000])
def test_top_p_nucleus_wider_than_candidate_set(top_k):
    """A flat tail makes the nucleus span thousands of tokens (more than the sampler's
    first topk candidate pass); the exact nucleus must still be used."""
    vocab = 4096
    logits64 = torch.cat([torch.tensor([8.0], dtype=torch.float64),
                          torch.linspace(0.5, 0.0, vocab - 1, dtype=torch.float64)])
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))
    kept = logits64[:top_k] if top_k > 0 else logits64
    probs = torch.softmax(kept, 0)
    m = int((probs.cumsum(0) - probs < 0.9).sum())  # reference nucleus size, float64
    assert 1500 < m < min(vocab, top_k if top_k > 0 else vocab) - 100
    lg = torch.empty(vocab)
    lg[perm] = logits64.float()  # rank r lives at token perm[r]
    rank = torch.empty(vocab, dtype=torch.long)
    rank[perm] = torch.arange(vocab)
    c = draws(lg, SamplingParams(top_p=0.9, top_k=top_k), 600)
    ranks = [int(rank[t]) for t in c]
    assert max(ranks) < m + 5  # nothing outside the nucleus (float32 slack at the edge)
    assert max(ranks) > m - 300 and min(ranks) == 0


def test_mixed_batch_rows_keep_their_own_filters():
    lg = from_probs([0.5, 0.3, 0.15, 0.05])
    logits = lg.repeat(3, 1)
    rows = [row(SamplingParams(top_k=1, seed=1)), row(SamplingParams(temperature=0)),
            row(SamplingParams(top_p=0.7, seed=2))]
    seen = [set(), set(), set()]
    for _ in range(500):
        for i, t in enumerate(sample(logits, rows)):
            seen[i].add(t.token_id)
    assert seen == [{0}, {0}, {0, 1}]


# --- seeds -------------------------------------------------------------------------------

def _seq(seed: int, n: int = 40) -> list[int]:
    logits = torch.zeros(1, V)  # uniform: most informative about the RNG stream
    r = row(SamplingParams(seed=seed))
    return [sample(logits, [r])[0].token_id for _ in range(n)]


def test_same_seed_same_tokens_different_seed_different():
    assert _seq(123) == _seq(123)
    assert _seq(123) != _seq(124)
    assert len({tuple(_seq(s)) for s in range(5)}) == 5


def test_make_generator():
    assert make_generator(None) is None
    a, b = make_generator(7), make_generator(7)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.9, top_p=0.95, top_k=20, seed=42),
    SamplingParams(temperature=1.1, top_p=0.9, seed=43),
    SamplingParams(temperature=0.7, min_p=0.05, seed=44),
])
def test_seeded_row_independent_of_batch(params):
    target = torch.randn(V, generator=torch.Generator().manual_seed(0))
    alone = row(params)
    expected = [sample(target[None], [alone])[0].token_id for _ in range(30)]
    others = [SamplingParams(temperature=0), SamplingParams(temperature=1.3),
              SamplingParams(top_p=0.5, seed=7), SamplingParams(min_p=0.2, logprobs=3),
              SamplingParams(top_k=5, seed=3), SamplingParams(top_k=20)]
    for pos in (0, 3, 6):
        torch.manual_seed(pos)  # global RNG state differs per batch composition too
        mine = row(params)
        rows = [row(p) for p in others]
        rows.insert(pos, mine)
        got = []
        for _ in range(30):
            logits = torch.randn(len(rows), V)
            logits[pos] = target
            got.append(sample(logits, rows)[pos].token_id)
        assert got == expected, pos


# --- penalties ---------------------------------------------------------------------------

def _expected_penalties(logits, prompt, output, p: SamplingParams):
    out = logits.tolist()
    for t in set(prompt) | set(output):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    counts = Counter(output)
    for t, n in counts.items():
        out[t] -= p.frequency_penalty * n + p.presence_penalty
    return torch.tensor(out)


@settings(max_examples=100, deadline=None)
@given(prompt=st.lists(st.integers(0, V - 1), max_size=20),
       output=st.lists(st.integers(0, V - 1), max_size=20),
       rep=st.floats(0.1, 3.0), freq=st.floats(-2, 2), pres=st.floats(-2, 2),
       seed=st.integers(0, 1000))
def test_apply_penalties_matches_formula(prompt, output, rep, freq, pres, seed):
    logits = torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 5
    p = SamplingParams(repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres)
    expected = _expected_penalties(logits, prompt, output, p)
    got = apply_penalties(logits.clone(), prompt, output, p)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_repetition_penalty_signs_and_scope():
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0, 2.0])
    p = SamplingParams(repetition_penalty=2.0)
    got = apply_penalties(logits.clone(), [0, 1], [2, 3, 3], p)
    assert got.tolist() == [1.0, -4.0, 1.0, -4.0, 2.0]  # token 3 penalised once, 4 untouched


def test_frequency_presence_only_over_output():
    logits = torch.zeros(4)
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=1.0)
    got = apply_penalties(logits.clone(), [0, 0, 1], [1, 2, 2, 2], p)
    assert got.tolist() == [0.0, -1.5, -2.5, 0.0]


def test_penalties_change_greedy_choice():
    logits = torch.tensor([[3.0, 2.5, 0.0, 0.0]])
    plain = sample(logits, [row(output=[0, 0])])[0].token_id
    penal = sample(logits, [row(SamplingParams(temperature=0, frequency_penalty=1.0), output=[0, 0])])
    assert plain == 0 and penal[0].token_id == 1


# --- min_tokens --------------------------------------------------------------------------

def test_min_tokens_masks_eos_and_stop_ids_greedy():
    logits = torch.tensor([[5.0, 4.0, 3.0, 1.0]])  # eos=0, stop id=1
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1])
    assert sample(logits, [row(p, output=[3], banned=[0, 1])])[0].token_id == 2
    assert sample(logits, [row(p, output=[3, 3], banned=[0, 1])])[0].token_id == 0


def test_min_tokens_masks_sampled_rows():
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0]])
    r = row(SamplingParams(min_tokens=5, seed=3), output=[2], banned=[0, 1])
    seen = {sample(logits, [r])[0].token_id for _ in range(300)}
    assert seen == {2, 3}


# --- logprobs ----------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n", [0, 1, 5, 20])
def test_logprobs_chosen_and_top_n(temperature, n):
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(n))
    rows = [row(SamplingParams(temperature=temperature, logprobs=n, seed=1)), row()]
    out = sample(logits, rows)
    lp = torch.log_softmax(logits[0], -1)  # before temperature, by design
    tok = out[0]
    assert tok.logprob == pytest.approx(lp[tok.token_id].item(), abs=1e-6)
    assert len(tok.top_logprobs) == n
    vals = [v for _, v in tok.top_logprobs]
    assert vals == sorted(vals, reverse=True)
    ref_vals, ref_ids = lp.topk(n) if n else (torch.empty(0), torch.empty(0, dtype=torch.long))
    assert [i for i, _ in tok.top_logprobs] == ref_ids.tolist()
    assert vals == pytest.approx(ref_vals.tolist(), abs=1e-6)
    assert out[1].logprob is None and out[1].top_logprobs is None


def test_logprobs_after_penalties():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    p = SamplingParams(temperature=0, repetition_penalty=2.0, logprobs=2)
    tok = sample(logits, [row(p, output=[0])])[0]
    ref = torch.log_softmax(torch.tensor([1.0, 1.0, 0.5, -1.0]), -1)
    assert tok.logprob == pytest.approx(ref[tok.token_id].item(), abs=1e-6)
    assert [v for _, v in tok.top_logprobs] == pytest.approx(ref.topk(2).values.tolist(), abs=1e-6)


def test_sampled_token_type():
    out = sample(torch.randn(1, V), [row(SamplingParams(seed=0))])
    assert isinstance(out[0], SampledToken) and isinstance(out[0].token_id, int)


# --- SamplingParams validation -----------------------------------------------------------

INVALID = [
    ("temperature", -0.1), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.2),
    ("min_p", -0.1), ("min_p", 1.1),
    ("top_k", -2),
    ("max_tokens", 0), ("max_tokens", -5),
    ("min_tokens", -1), ("min_tokens", 17),  # > default max_tokens=16
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("frequency_penalty", 2.5), ("frequency_penalty", -2.1),
    ("presence_penalty", 2.1), ("presence_penalty", -3.0),
    ("logprobs", -1), ("logprobs", 21),
    ("stop", [""]), ("stop", ["ok", ""]),
    ("stop_token_ids", [-1]),
]


@pytest.mark.parametrize("field,value", INVALID)
def test_invalid_values_raise_naming_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_invalid_message_names_value():
    with pytest.raises(ValueError, match=r"top_p.*1\.5"):
        SamplingParams(top_p=1.5)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.0), dict(top_p=1.0), dict(top_k=-1), dict(top_k=0), dict(top_k=1),
    dict(min_p=0.0), dict(min_p=1.0), dict(max_tokens=1), dict(min_tokens=16),
    dict(frequency_penalty=2.0), dict(presence_penalty=-2.0), dict(logprobs=0), dict(logprobs=20),
])
def test_boundary_values_accepted(kwargs):
    SamplingParams(**kwargs)


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.logprobs) == (16, 1.0, -1, 1.0, None)
    assert not p.greedy and SamplingParams(temperature=0).greedy
    q = SamplingParams(stop=["a", "b"], stop_token_ids=[5, 6])
    assert q.stop == ("a", "b") and q.stop_token_ids == (5, 6)
    assert SamplingParams(stop="x").stop == ("x",)
    hash(q)  # frozen and hashable
    with pytest.raises(Exception):
        q.temperature = 0.5


def test_validate_for_prompt():
    p = SamplingParams(max_tokens=100)
    p.validate_for_prompt(924, 1024)
    with pytest.raises(ValueError, match="1024.*1025.*925.*100"):
        p.validate_for_prompt(925, 1024)
    with pytest.raises(ValueError, match="empty"):
        p.validate_for_prompt(0, 1024)
