"""n > 1 on the real default model (runtime/fork.py): colocated (with and without the
prefix cache) and prefill -> decode (hold, KV copied once, adopt, fork). Greedy sequences
all equal the n = 1 output; seeded ones are reproducible, sequence 0 is the n = 1 output
with the same seed, and the others differ; every page comes back."""
from __future__ import annotations

import pytest

from pdmesh import Engine, SamplingParams
from pdmesh.runtime.request import Mode

MESSAGES = [{"role": "user", "content": "Write one sentence about a red bicycle in the rain."}]
PS = 8


@pytest.fixture(scope="module")
def engines(default_model):
    """(prefill, decode without a cache, colocated with one): same page size."""
    a = Engine(loaded=default_model, page_size=PS, num_pages=120)
    b = Engine(loaded=default_model, page_size=PS, num_pages=100, prefix_cache=False)
    c = Engine(loaded=default_model, page_size=PS, num_pages=100, prefix_cache=True)
    return a, b, c


@pytest.fixture(scope="module")
def prompt(engines):
    return engines[0].tokenizer.apply_chat_template(MESSAGES)


def run(e: Engine) -> dict[int, list[int]]:
    """Step until idle; every sequence's tokens by index (request ids must match it)."""
    outs: dict[str, object] = {}
    while e.has_unfinished():
        for o in e.step():
            outs[o.request_id] = o
    assert all(o.finished for o in outs.values())
    return {o.index: o.token_ids for o in outs.values()}


def colocated(e: Engine, ids, p: SamplingParams, rid: str) -> dict[int, list[int]]:
    e.add_request(prompt_token_ids=ids, params=p, request_id=rid)
    return run(e)


def pd(a: Engine, b: Engine, ids, p: SamplingParams, rid: str) -> dict[int, list[int]]:
    """The prompt computed once on `a`, its KV copied once into `b`, forked there."""
    req = a.make_request(prompt_token_ids=ids, params=p, request_id=rid, mode=Mode.PREFILL_ONLY)
    a.requests[rid] = req
    a.scheduler.add(req)
    first = _prefill(a, rid)
    dst = b.hold(b.make_request(prompt_token_ids=ids, params=p, request_id=rid,
                                mode=Mode.ADOPTED))
    b.runner.kv[dst[:len(first.pages)]] = a.runner.kv[first.pages]  # the one transfer
    a.release(rid)
    outs = {0: b.adopt(rid, first.token_ids[0], first.logprobs[0] if first.logprobs else None)}
    got = run(b)
    got.setdefault(0, outs[0].token_ids)
    return got


def _prefill(a: Engine, rid: str):
    while True:
        for o in a.step():
            if o.request_id == rid:
                assert o.index == 0  # a prefill never forks: the decode does
                return o


def assert_all_free(*engines: Engine) -> None:
    for e in engines:
        e.flush_cache()
        s = e.stats()
        assert s["free_pages"] == s["num_pages"] and s["used_pages"] == 0, s
        assert not e.requests


@pytest.mark.parametrize("where", ["colocated", "colocated-cache", "pd"])
def test_greedy_sequences_equal_the_single_output(engines, prompt, where):
    a, b, c = engines
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    want = c.generate(prompt_token_ids=prompt, params=greedy)[0].token_ids
    p2 = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, n=3)
    got = (colocated(b, prompt, p2, f"g-{where}") if where == "colocated" else
           colocated(c, prompt, p2, f"g-{where}") if where == "colocated-cache" else
           pd(a, b, prompt, p2, f"g-{where}"))
    assert got == {0: want, 1: want, 2: want}
    assert_all_free(a, b, c)


@pytest.mark.parametrize("where", ["colocated", "pd"])
def test_seeded_sequences_reproducible_distinct_and_first_is_n1(engines, prompt, where):
    a, b, c = engines
    p = SamplingParams(max_tokens=8, temperature=1.0, seed=11, n=4)
    go = (lambda rid: colocated(c, prompt, p, rid)) if where == "colocated" else \
        (lambda rid: pd(a, b, prompt, p, rid))
    x, y = go(f"s1-{where}"), go(f"s2-{where}")
    assert sorted(x) == [0, 1, 2, 3] and x == y
    assert len({tuple(t) for t in x.values()}) > 1, x
    one = SamplingParams(max_tokens=8, temperature=1.0, seed=11)
    single = colocated(c, prompt, one, f"s3-{where}") if where == "colocated" else \
        pd(a, b, prompt, one, f"s3-{where}")
    assert single == {0: x[0]}
    assert_all_free(a, b, c)


def test_decode_shares_the_prompt_pages_and_aborts_free_them(engines, prompt):
    a, b, _ = engines
    p = SamplingParams(max_tokens=30, temperature=0.8, seed=3, n=4, ignore_eos=True)
    rid = "abort-me"
    req = a.make_request(prompt_token_ids=prompt, params=p, request_id=rid,
                         mode=Mode.PREFILL_ONLY)
    a.requests[rid] = req
    a.scheduler.add(req)
    first = _prefill(a, rid)
    dst = b.hold(b.make_request(prompt_token_ids=prompt, params=p, request_id=rid,
                                mode=Mode.ADOPTED))
    b.runner.kv[dst] = a.runner.kv[first.pages]
    a.release(rid)
    b.adopt(rid, first.token_ids[0])
    full = (len(prompt) - 1) // PS
    prompt_pages = -(-len(prompt) // PS)
    assert b.stats()["used_pages"] == prompt_pages  # the children's tails: reserved
    assert b.stats()["reserved_pages"] == 3
    b.step()  # the children recompute the last, partial page: one page each
    # the shared full pages once, plus one page of its own per sequence for the last one
    assert b.stats()["used_pages"] == prompt_pages + 3
    assert b.stats()["reserved_pages"] == 0
    b.step()
    kids = [b.requests[f"{rid}/{i}"] for i in (1, 2, 3)]
    parent = b.requests[rid]
    assert all(k.pages[:full] == parent.pages[:full] for k in kids)
    assert parent.group.refs == 4
    for r in [rid] + [k.request_id for k in kids]:
        assert b.abort(r)
    assert_all_free(a, b)
