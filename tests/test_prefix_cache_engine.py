"""Prefix cache exactness with the model (float32, conftest): greedy tokens with the cache
equal those without it, whole and chunked prefill, under eviction pressure, colocated and
1P1D (the prefill's KV copied into a decode engine), and cached_tokens is reported."""
from __future__ import annotations

import pytest

from pdmesh import Engine, SamplingParams
from test_engine_pd import prefill_only
from pdmesh.runtime.request import Mode

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
SYSTEM = ("You are a careful assistant for a small bakery. Answer in one short sentence, "
          "mention the bakery's name (Crumb & Co.) when it fits, and never invent prices.")
QUESTIONS = ["When do you open?", "Do you sell rye bread?", "Can I order a birthday cake?"]


def prompts(engine: Engine) -> list[list[int]]:
    return [engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
        add_generation_prompt=True) for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(default_model):
    """Without a cache, one request at a time: (prompt ids, greedy tokens) per question,
    then a repeat of the first and a second turn that extends the first conversation."""
    e = Engine(loaded=default_model, num_threads=1, page_size=8, num_pages=256, prefix_cache=False)
    ps = prompts(e)
    turn2 = ps[0] + e.generate(prompt_token_ids=ps[0], params=GREEDY)[0].token_ids + \
        e.tokenizer.encode("Thanks! And on Sundays?")
    ps = ps + [ps[0], turn2]
    return ps, [e.generate(prompt_token_ids=p, params=GREEDY)[0].token_ids for p in ps]


def run_sequential(e: Engine, ps: list[list[int]]):
    outs = [e.generate(prompt_token_ids=p, params=GREEDY)[0] for p in ps]
    return [o.token_ids for o in outs], [o.cached_tokens for o in outs]


def test_cached_greedy_tokens_equal_uncached_whole_and_chunked(default_model, reference):
    ps, want = reference
    n = len(QUESTIONS)
    e = Engine(loaded=default_model, num_threads=1, page_size=8, num_pages=256, prefix_cache=True)
    for chunk in (2048, 8):  # whole-prompt prefill, then 8-token chunks
        e.scheduler.chunk, e.scheduler.max_prefill_tokens = chunk, max(chunk, 16)
        got, cached = run_sequential(e, ps)
        assert got == want, f"chunk {chunk}"
        shared = min(len(p) for p in ps[:n]) // 8 * 8  # the system prompt's pages, at least
        assert cached[0] == 0 and all(c >= shared - 8 for c in cached[1:n])
        assert cached[n] == (len(ps[0]) - 1) // 8 * 8  # whole prompt again: all but its last page
        assert cached[n + 1] > len(ps[0])  # turn 2 reuses turn 1's prompt and decoded pages
        assert e.stats()["used_pages"] == 0 and e.stats()["cached_pages"] > 0
        e.flush_cache()
        assert e.allocator.num_free == 256 and e.stats()["cached_pages"] == 0
    # all at once in one batch (the system prompt cached by a first request): same tokens
    e.generate(prompt_token_ids=ps[0], params=GREEDY)
    outs = e.generate(prompt_token_ids=ps, params=GREEDY)
    assert [o.token_ids for o in outs] == want
    assert all(o.cached_tokens > 0 for o in outs)
    e.flush_cache()
    assert e.allocator.num_free == 256


def test_under_eviction_pressure(default_model, reference):
    ps, want = reference
    # a pool just large enough for one request at a time: every admission evicts
    need = max(-(-(len(p) + GREEDY.max_tokens) // 4) for p in ps)
    e = Engine(loaded=default_model, num_threads=1, page_size=4, num_pages=need + 2, prefix_cache=True,
               chunked_prefill_size=16, max_prefill_tokens=32)
    got, _ = run_sequential(e, ps)
    assert got == want
    assert e.cache.evicted > 0 and e.stats()["cache_hit_pages"] > 0


def test_1p1d_prefill_cache_equals_uncached(default_model, reference):
    """The prefill engine caches; its (partly cached) pages are copied into a decode
    engine that adopts them: same tokens, and the prefill reports cached_tokens."""
    ps, want = reference
    pre = Engine(loaded=default_model, num_threads=1, page_size=8, num_pages=128, prefix_cache=True)
    dec = Engine(loaded=default_model, num_threads=1, page_size=8, num_pages=128, prefix_cache=True,
                 decode_prefix_cache=False)  # the decode side's reuse: test_decode_reuse*.py
    for i, (ids, w) in enumerate(zip(ps, want)):
        rid = f"pd{i}"
        first = prefill_only(pre, ids, rid, GREEDY)
        assert len(first.pages) == -(-len(ids) // 8)
        req = dec.make_request(prompt_token_ids=ids, params=GREEDY, request_id=rid,
                               mode=Mode.ADOPTED)
        dst = dec.hold(req)
        dec.runner.kv[dst] = pre.runner.kv[first.pages]  # what the transfer does
        pre.release(rid)
        outs = [dec.adopt(rid, first.token_ids[0])]
        while not outs[-1].finished:
            outs += [o for o in dec.step() if o.request_id == rid]
        assert outs[-1].token_ids == w
        assert (first.cached_tokens > 0) == (i > 0)
    assert dec.stats()["cached_pages"] == 0  # ADOPTED requests leave nothing in the cache
    assert pre.stats()["cached_pages"] > 0 and pre.stats()["used_pages"] == 0
