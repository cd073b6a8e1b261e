"""The two halves the workers use (prefill-only, hold + adopt), aborts, and bad input."""
from __future__ import annotations

import pytest

from pdmesh import Engine, SamplingParams
from pdmesh.runtime.request import Mode

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def engines(default_model):
    # same page size (a transfer needs identical layouts); different pools and page ids
    a = Engine(loaded=default_model, page_size=8, num_pages=300)
    b = Engine(loaded=default_model, page_size=8, num_pages=200)
    return a, b


def prefill_only(engine: Engine, ids: list[int], rid: str, params: SamplingParams = GREEDY):
    """Prefill `ids` alone as request `rid` (PREFILL_ONLY) and return its output, which
    carries the first token; its pages stay held for a transfer."""
    req = engine.make_request(prompt_token_ids=ids, params=params, request_id=rid,
                              mode=Mode.PREFILL_ONLY)
    engine.requests[rid] = req
    engine.scheduler.add(req)
    while True:
        for out in engine.step():
            if out.request_id == rid:
                return out


def test_prefill_copy_adopt_equals_one_engine(engines):
    a, b = engines
    ids = a.tokenizer.apply_chat_template(MESSAGES)
    want = a.generate(prompt_token_ids=ids, params=GREEDY)[0].token_ids
    # burn a few pages in B so its page ids differ from A's
    burn = b.make_request(prompt_token_ids=ids[:20], params=GREEDY, request_id="burn",
                          mode=Mode.ADOPTED)
    assert b.hold(burn) is not None

    first = prefill_only(a, ids, "r1")
    assert first.finished and len(first.token_ids) == 1
    src = first.pages
    assert len(src) == -(-len(ids) // 8)  # exactly the prompt's pages are held

    req = b.make_request(prompt_token_ids=ids, params=GREEDY, request_id="r1", mode=Mode.ADOPTED)
    dst = b.hold(req)
    assert dst is not None and dst[: len(src)] != src
    b.runner.kv[dst[: len(src)]] = a.runner.kv[src]  # what the transfer engine does
    a.release("r1")
    assert a.stats()["used_pages"] == 0

    outs = [b.adopt("r1", first.token_ids[0])]
    while not outs[-1].finished:
        outs += [o for o in b.step() if o.request_id == "r1"]
    assert outs[-1].token_ids == want
    b.abort("burn")
    assert b.stats()["used_pages"] == 0 and b.stats()["reserved_pages"] == 0


def test_hold_refuses_when_pool_is_short(default_model):
    e = Engine(loaded=default_model, page_size=8, num_pages=10)
    ids = list(range(100, 150))  # 50 tokens + 24 - 1 -> 10 pages: fits exactly once
    r1 = e.make_request(prompt_token_ids=ids, params=GREEDY, mode=Mode.ADOPTED)
    assert e.hold(r1) is not None
    r2 = e.make_request(prompt_token_ids=ids, params=GREEDY, mode=Mode.ADOPTED)
    assert e.hold(r2) is None
    e.abort(r1.request_id)
    assert e.hold(r2) is not None
    e.abort(r2.request_id)
    assert e.stats()["free_pages"] == 10


@pytest.mark.parametrize("steps", [0, 1, 3, 8])
def test_abort_at_any_point_frees_everything(engines, steps):
    a, _ = engines
    long_prompt = list(range(200, 260))
    rids = [a.add_request(prompt_token_ids=long_prompt, params=GREEDY) for _ in range(3)]
    for _ in range(steps):
        a.step()
    for rid in rids:
        assert a.abort(rid)
    assert not a.abort(rids[0])  # unknown now
    st = a.stats()
    assert st["used_pages"] == 0 and st["reserved_pages"] == 0 and st["running"] == 0
    assert not a.has_unfinished()


def test_stop_string_and_stop_token(engines):
    a, _ = engines
    ids = a.tokenizer.apply_chat_template(MESSAGES)
    full = a.generate(prompt_token_ids=ids, params=GREEDY)[0]
    word = full.text.split()[2]
    out = a.generate(prompt_token_ids=ids, params=SamplingParams(
        max_tokens=24, temperature=0, stop=[word]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == word
    assert out.text == full.text[: full.text.index(word)]
    tok = full.token_ids[3]
    out = a.generate(prompt_token_ids=ids, params=SamplingParams(
        max_tokens=24, temperature=0, stop_token_ids=[tok]))[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[:4]


def test_seeded_sampling_reproducible_and_min_tokens(engines):
    a, _ = engines
    p = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=42)
    x = a.generate(messages=MESSAGES, params=p)[0].token_ids
    y = a.generate(messages=MESSAGES, params=p)[0].token_ids
    z = a.generate(messages=MESSAGES, params=SamplingParams(max_tokens=12, temperature=0.9,
                                                          top_p=0.9, seed=43))[0].token_ids
    assert x == y and x != z
    out = a.generate(messages=MESSAGES, params=SamplingParams(max_tokens=8, min_tokens=8,
                                                             temperature=0))[0]
    assert len(out.token_ids) == 8 and a.tokenizer.eos_token_ids[0] not in out.token_ids


def test_logprobs_returned(engines):
    a, _ = engines
    out = a.generate("Hello", SamplingParams(max_tokens=4, temperature=0, logprobs=3))[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok and lp.logprob <= 0
        assert len(lp.top_logprobs) == 3 and lp.top_logprobs[0][0] == tok  # greedy = top-1


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_token_ids=[]), "prompt"),
    (dict(prompt_token_ids=[1, 10 ** 9]), "out of range"),
    (dict(prompt="hi", params=SamplingParams(max_tokens=9000)), "context"),
    (dict(messages=[]), "messages"),
    (dict(prompt=["not", "a", "string"]), "string"),
])
def test_bad_input_is_a_clear_error_and_changes_nothing(engines, kwargs, message):
    a, _ = engines
    before = a.stats()
    with pytest.raises(ValueError, match=message):
        a.add_request(**kwargs)
    assert a.stats() == before and not a.has_unfinished()


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(top_k=-2), "top_k"), (dict(min_p=2), "min_p"),
])
def test_invalid_sampling_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_prefill_mooncake_adopt_equals_one_engine(engines):
    """The PD data path for real: A's prompt KV pages written into B's pool by the Mooncake
    transfer engine (tcp, loopback, two engines), then B adopts and decodes."""
    from pdmesh.transfer import KVLayout, check_compatible, get_transport

    a, b = engines
    ids = a.tokenizer.apply_chat_template([{"role": "user", "content": "Why is the sea salty?"}])
    want = a.generate(prompt_token_ids=ids, params=GREEDY)[0].token_ids
    la, lb = KVLayout.from_engine(a, "smollm2"), KVLayout.from_engine(b, "smollm2")
    mc = get_transport("mooncake")
    with mc() as src_t, mc() as dst_t:
        src_base, dst_base = src_t.register(a.runner.kv), dst_t.register(b.runner.kv)
        first = prefill_only(a, ids, "room-7")
        req = b.make_request(prompt_token_ids=ids, params=GREEDY, request_id="room-7",
                             mode=Mode.ADOPTED)
        dst = b.hold(req)[: len(first.pages)]
        check_compatible(la, lb, dst)
        stats = src_t.write_pages(dst_t.session_id, src_base, dst_base, la.bytes_per_page,
                                  first.pages, dst)
        a.release("room-7")
    assert stats.bytes == len(dst) * la.bytes_per_page and stats.descriptors >= 1
    outs = [b.adopt("room-7", first.token_ids[0])]
    while not outs[-1].finished:
        outs += [o for o in b.step() if o.request_id == "room-7"]
    assert outs[-1].token_ids == want
    assert a.stats()["used_pages"] == 0 and b.stats()["used_pages"] == 0
