"""Admission on an estimate of future decode tokens, and retraction under page pressure.

Engine tests use the real default model with small pools; the state machine drives the
scheduler alone (no torch) through the fake engine loop of tests/test_scheduler.py,
whose checks it inherits: every batch's shape, FIFO admission, retraction order, and the
page accounting invariant (allocator.check(), no page owned twice, reservations >= 0 and
backed by free pages, free + owned == total) after every rule.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings, target
from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule

from pdmesh import Engine, SamplingParams
from pdmesh.runtime.admission import NewTokenRatio, pages_for
from pdmesh.runtime.allocator import PageAllocator
from pdmesh.runtime.request import Mode, Status
from pdmesh.runtime.scheduler import Scheduler
from test_scheduler import SchedulerMachine, append_token, engine_step, make_req

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "List three prime numbers.", "Why is the sky blue?", "Name a fruit."]


def chat_ids(engine: Engine, question: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": question}])


def open_ended(engine: Engine, ids: list[int]) -> SamplingParams:
    """What the gateway sends for a request without max_tokens: the context left."""
    return SamplingParams(max_tokens=engine.max_model_len - len(ids), temperature=0,
                          ignore_eos=True)


def run_all(engine: Engine, streamed: dict[str, list[int]] | None = None,
            ) -> dict[str, list[int]]:
    """Step to the end; every request's streamed tokens (checked against its final ones)."""
    streamed = streamed if streamed is not None else {}
    while engine.has_unfinished():
        for out in engine.step():
            streamed.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                assert streamed[out.request_id] == out.token_ids, "a token was re-emitted"
    return streamed


def assert_all_pages_back(engine: Engine) -> None:
    engine.allocator.check()
    st_ = engine.stats()
    assert st_["free_pages"] == st_["num_pages"] and st_["reserved_pages"] == 0
    assert st_["running"] == st_["waiting"] == st_["held"] == 0 and not engine.requests


# -- engine ---------------------------------------------------------------------------------
def test_short_request_is_admitted_while_open_ended_requests_run(default_model):
    e = Engine(loaded=default_model, page_size=16, num_pages=200, max_model_len=1024)
    long_ids = [chat_ids(e, q) for q in QUESTIONS[:4]]
    # reserving max_tokens up front would take 64 pages each: only 3 of the 4 would fit
    assert 4 * pages_for(e.max_model_len - 1, 16) > 200
    longs = [e.add_request(prompt_token_ids=ids, params=open_ended(e, ids)) for ids in long_ids]
    for _ in range(3):
        e.step()
    assert all(e.requests[r].status is Status.DECODING for r in longs)
    short = e.add_request(prompt="Hi", params=SamplingParams(max_tokens=4, temperature=0))
    steps = 0
    while short in e.requests:
        e.step()
        steps += 1
        assert steps <= 5, "the short request was not admitted at once"
    assert steps == 4  # its prefill, then 3 decode steps: it never waited
    assert all(e.requests[r].status is Status.DECODING for r in longs)
    st_ = e.stats()
    assert st_["retracted"] == 0 and st_["running"] == 4 and st_["estimated_pages"] > 0
    assert st_["used_pages"] <= 4 * 4 and 0.1 <= st_["new_token_ratio"] < 0.7  # decayed
    for r in longs:
        assert e.abort(r)
    assert_all_pages_back(e)


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_greedy_output_through_retraction_equals_unpressured_run(default_model, prefix_cache):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ref = Engine(loaded=default_model, page_size=4, num_pages=400, prefix_cache=False)
    prompts = [chat_ids(ref, q) for q in QUESTIONS]
    want = [o.token_ids for o in ref.generate(prompt_token_ids=prompts, params=params)]
    tight = Engine(loaded=default_model, page_size=4, num_pages=24,  # 5 x 15 pages needed
                   prefix_cache=prefix_cache)
    tight.scheduler.ratio = NewTokenRatio(init=0.2, min=0.1)  # admit boldly: force retraction
    rids = [tight.add_request(prompt_token_ids=p, params=params) for p in prompts]
    got = run_all(tight)
    assert [got[r] for r in rids] == want
    # the cache shares the chat template's pages: less pressure, fewer retractions
    assert tight.stats()["retracted"] >= (1 if prefix_cache else 3)
    tight.flush_cache()
    assert_all_pages_back(tight)


def test_retracted_adopted_request_is_recomputed_locally(default_model):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    pre = Engine(loaded=default_model, page_size=4, num_pages=100)
    ids = chat_ids(pre, "Why is the sea salty?")
    want = pre.generate(prompt_token_ids=ids, params=params)[0].token_ids
    dec = Engine(loaded=default_model, page_size=4, num_pages=34)  # ~46 pages needed
    dec.scheduler.ratio = NewTokenRatio(init=0.1, min=0.1)
    others = [dec.add_request(prompt_token_ids=chat_ids(dec, q), params=params)
              for q in QUESTIONS[:2]]
    streamed: dict[str, list[int]] = {r: [] for r in others}
    for _ in range(4):  # both decoding: the adopted request will be the one with fewest tokens
        for out in dec.step():
            streamed[out.request_id] += out.new_token_ids
    req = pre.make_request(prompt_token_ids=ids, params=params, request_id="room",
                           mode=Mode.PREFILL_ONLY)
    pre.requests["room"] = req
    pre.scheduler.add(req)
    first = next(o for o in pre.step() if o.request_id == "room")
    held = dec.make_request(prompt_token_ids=ids, params=params, request_id="room",
                            mode=Mode.ADOPTED)
    dst = dec.hold(held)
    assert dst is not None
    dec.runner.kv[dst] = pre.runner.kv[first.pages]  # what the transfer engine does
    pre.release("room")
    streamed["room"] = dec.adopt("room", first.token_ids[0]).new_token_ids
    got = run_all(dec, streamed)
    assert held.retractions >= 1 and held.mode is Mode.GENERATE  # recomputed here
    assert got["room"] == want
    assert all(len(got[r]) == 24 for r in others)
    assert_all_pages_back(dec)
    assert_all_pages_back(pre)


def test_request_longer_than_the_pool_ends_with_length(default_model):
    e = Engine(loaded=default_model, page_size=8, num_pages=4)  # 32 tokens of KV
    ids = list(range(300, 320))
    out = e.generate(prompt_token_ids=ids, params=open_ended(e, ids))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 13  # 20 + 13 - 1 = 32
    ref = Engine(loaded=default_model, page_size=8, num_pages=64)
    assert out.token_ids == ref.generate(prompt_token_ids=ids, params=SamplingParams(
        max_tokens=13, temperature=0, ignore_eos=True))[0].token_ids
    with pytest.raises(ValueError, match="prompt needs 33 tokens"):
        e.add_request(prompt_token_ids=list(range(300, 333)))
    assert_all_pages_back(e)


# -- stateful: the scheduler under page pressure --------------------------------------------
MAX_MODEL_LEN = 160  # "without max_tokens" means max_tokens = MAX_MODEL_LEN - prompt


class AdmissionMachine(SchedulerMachine):
    """Small pools, open-ended requests and a bold ratio: retraction happens often."""

    @initialize(num_pages=st.integers(4, 40), page_size=st.integers(1, 6),
                max_running=st.integers(1, 8), max_prefill=st.integers(1, 64),
                chunk=st.integers(1, 48), init=st.sampled_from([0.05, 0.05, 0.3, 0.7]))
    def setup(self, num_pages, page_size, max_running, max_prefill, chunk, init):
        self.alloc = PageAllocator(num_pages)
        ratio = NewTokenRatio(init=init, min=min(init, 0.1), decay_steps=20)
        self.s = Scheduler(self.alloc, page_size, max_running, max_prefill, chunk, ratio)
        self.num_pages, self.page_size = num_pages, page_size
        self.max_running, self.max_prefill, self.chunk = max_running, max_prefill, chunk
        self.reqs, self.pending = [], []

    @rule(prompt_len=st.integers(1, 60), max_tokens=st.one_of(st.none(), st.integers(1, 60)),
          mode=st.sampled_from([Mode.GENERATE, Mode.GENERATE, Mode.ADOPTED]))
    def arrive(self, prompt_len, max_tokens, mode):
        SchedulerMachine.arrive(self, prompt_len, max_tokens or MAX_MODEL_LEN - prompt_len, mode)

    # -- the outside world: KV arrives for held requests; held PREFILL_ONLY pages get sent --
    def world_turn(self) -> None:
        for r in list(self.pending):
            if self.try_hold(r):
                self.pending.remove(r)
        for r in [r for r in self.s.held.values() if r.mode is Mode.ADOPTED]:
            self.do_adopt(r)
        if self.step_once() is None:
            held = [r for r in self.s.held.values() if r.mode is Mode.PREFILL_ONLY]
            if held:
                self.s.finish(held[0], "length")

    def step_cap(self) -> int:
        """Steps within which something must happen. Each decode step samples a token, so
        at most sum(max_tokens) of them; each may retract max_running requests, each of
        which costs at most one recompute prefill step per token."""
        todo = self.live() + self.pending
        longest = max((r.prompt_len + r.params.max_tokens for r in todo), default=0)
        tokens = sum(r.prompt_len + r.params.max_tokens for r in todo)
        return tokens * (1 + self.max_running * longest) + len(todo) + 2

    @precondition(lambda self: self.s.has_work() or self.s.held or self.pending)
    @rule()
    def progress(self):
        """No deadlock or livelock: within a bounded number of steps a request finishes
        (or, when only holds are queued outside the scheduler, one of them is taken)."""
        before, pending = self.live(), len(self.pending)
        for _ in range(self.step_cap()):
            self.world_turn()
            if any(r.finished for r in before) or (not before and len(self.pending) < pending):
                return
        raise AssertionError("no request finished within the bound")

    def teardown(self):
        super().teardown()  # drains everything: every page back, every request finished
        if hasattr(self, "s"):
            target(float(min(self.s.num_retracted, 10)), label="retractions")  # seek pressure

    @precondition(lambda self: any(r.retractions for r in self.s.waiting))
    @rule()
    def retracted_is_rescheduled(self):
        """No starvation: a retracted request is admitted again within a bounded time."""
        r = next(r for r in self.s.waiting if r.retractions)
        for _ in range(self.step_cap()):
            if r.status is not Status.WAITING:
                return
            self.world_turn()
        raise AssertionError(f"{r.request_id} was never rescheduled")


AdmissionMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None, report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestAdmissionMachine = AdmissionMachine.TestCase


def test_plain_scheduler_retraction_order_and_ratio():
    """Two equal requests outgrow a 30-page pool: the newest is retracted, goes to the
    queue head, is recomputed without sampling, and finishes with all its tokens."""
    s = Scheduler(PageAllocator(30), 1, 8, 100, 100)
    a, b = make_req(1, 20), make_req(1, 20)
    s.add(a)
    s.add(b)
    while s.num_retracted == 0:
        engine_step(s)
    assert b.status is Status.WAITING and b.retractions == 1 and list(s.waiting) == [b]
    assert b.pages == [] and len(b.output_ids) == 15 and s.ratio.value > 0.8  # bumped
    late = make_req(1, 2, mode=Mode.ADOPTED)
    assert s.hold_for_adopt(late) is None  # the retracted request goes first
    while not a.finished:
        engine_step(s)
    batch = s.schedule()  # b's recompute: its 15 tokens of KV, nothing sampled
    assert batch.kind == "prefill" and [(q.req, q.start, q.length, q.sample)
                                        for q in batch.seqs] == [(b, 0, 15, False)]
    s.computed(batch)
    while s.has_work():
        engine_step(s)
    assert len(a.output_ids) == len(b.output_ids) == 20 and s.allocator.num_free == 30



def test_decode_waits_for_held_pages_then_retracts_the_adopted_request():
    s = Scheduler(PageAllocator(10), 1, 8, 100, 100, NewTokenRatio(init=0.05, min=0.05))
    a = make_req(1, 20)
    s.add(a)
    engine_step(s)
    b = make_req(5, 2, mode=Mode.ADOPTED)  # 5 pages + ceil(1 * 0.05) token: fits beside a
    assert s.hold_for_adopt(b) is not None
    while engine_step(s):  # a grows into the 4 pages left, then waits for b's 5
        pass
    assert s.stalled and a.status is Status.DECODING and len(a.pages) == 5
    assert s.has_work() and s.schedule() is None and s.stalled  # until b's KV arrives
    s.adopt(b)
    append_token(s, b)  # the prefill's first token
    batch = s.schedule()  # b has generated least: retracted, to be recomputed here
    assert not s.stalled and [q.req for q in batch.seqs] == [a] and list(s.waiting) == [b]
    assert b.mode is Mode.GENERATE and b.retractions == 1
    s.computed(batch)
    append_token(s, a)
    while s.has_work():
        engine_step(s)
    assert a.finish_reason == "length" and len(a.output_ids) == 10  # its KV filled the pool
    assert len(b.output_ids) == 2 and s.allocator.num_free == 10 and s.reserved == 0
