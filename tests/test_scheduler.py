"""Scheduler without a model: a fake engine loop drives schedule() / computed() / finish().

The fake loop mirrors Engine.step: schedule a batch, mark it computed, append a fake
token for every `sample` seq, finish GENERATE/ADOPTED requests at max_tokens (or when
their KV would outgrow the pool), leave PREFILL_ONLY requests held until released.
Admission on estimates and retraction under pressure: tests/test_admission.py.
"""
from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pdmesh.runtime.allocator import PageAllocator
from pdmesh.runtime.request import Mode, Request, Status
from pdmesh.runtime.sampling_params import SamplingParams
from pdmesh.runtime.scheduler import Batch, Scheduler, pages_for

FAKE_TOKEN = 7
_ids = itertools.count()


def make_req(prompt_len: int, max_tokens: int = 1, mode: Mode = Mode.GENERATE) -> Request:
    return Request(f"r{next(_ids)}", list(range(prompt_len)), SamplingParams(max_tokens=max_tokens),
                   mode=mode)


def make_sched(num_pages=64, page_size=4, max_running=8, max_prefill=64, chunk=32):
    alloc = PageAllocator(num_pages)
    return Scheduler(alloc, page_size, max_running, max_prefill, chunk)


def append_token(s: Scheduler, req: Request) -> None:
    """What the engine does with a sampled token (fake sampler: no stop tokens)."""
    req.output_ids.append(FAKE_TOKEN)
    if req.mode is Mode.PREFILL_ONLY:
        return  # stays held until released
    if len(req.output_ids) >= req.params.max_tokens or s.out_of_room(req):
        s.finish(req, "length")


def engine_step(s: Scheduler) -> Batch | None:
    batch = s.schedule()
    if batch is None:
        return None
    s.computed(batch)
    for seq in batch.seqs:
        if seq.sample:
            append_token(s, seq.req)
    return batch


# -- plain tests ----------------------------------------------------------------------------
def test_chunked_prefill_splits_prompt():
    s = make_sched(num_pages=64, page_size=4, max_prefill=1000, chunk=32)
    r = make_req(100, max_tokens=3)
    s.add(r)
    chunks = []
    while r.status is not Status.DECODING:
        b = s.schedule()
        assert b.kind == "prefill" and len(b.seqs) == 1
        seq = b.seqs[0]
        assert seq.req is r and seq.start == r.num_computed
        chunks.append((seq.start, seq.length, seq.sample))
        assert len(r.pages) == pages_for(seq.start + seq.length, 4)  # allocated lazily, exactly
        s.computed(b)
        if seq.sample:
            append_token(s, r)
    assert chunks == [(0, 32, False), (32, 32, False), (64, 32, False), (96, 4, True)]
    assert r.num_computed == 100
    # then max_tokens - 1 = 2 decode steps, and the request is done with every page back
    for expect_start in (100, 101):
        b = s.schedule()
        assert b.kind == "decode" and [(q.start, q.length, q.sample) for q in b.seqs] == \
            [(expect_start, 1, True)]
        s.computed(b)
        append_token(s, r)
    assert r.status is Status.FINISHED and r.finish_reason == "length"
    assert s.schedule() is None and not s.has_work()
    assert s.allocator.num_free == 64 and s.reserved == 0


def test_prefill_budget_is_shared_across_requests():
    s = make_sched(num_pages=64, page_size=4, max_prefill=50, chunk=32)
    a, b = make_req(40), make_req(40)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    assert [(q.req, q.start, q.length) for q in batch.seqs] == [(a, 0, 32), (b, 0, 18)]
    s.computed(batch)
    batch = s.schedule()  # the unfinished prompts continue, in order
    assert [(q.req, q.start, q.length, q.sample) for q in batch.seqs] == \
        [(a, 32, 8, True), (b, 18, 22, True)]


def test_admission_reserves_the_prefill_and_only_estimates_decode():
    s = make_sched(num_pages=20, page_size=4, max_prefill=8, chunk=8)
    r = make_req(10, max_tokens=11)  # prompt: 3 pages; at most 20 tokens of KV -> 5 pages
    s.add(r)
    s.computed(s.schedule())
    assert len(r.pages) == 2 and r.reserved == 1 and s.reserved == 1  # the prompt's 3rd page
    assert s.available_pages == 20 - 2 - 1
    # decode: 10 more tokens at most, estimated ceil(10 * 0.7) = 7 -> 17 tokens -> 2 pages
    assert s.ratio.value == 0.7 and s.estimated_pages() == 5 - 3


def test_oversize_request_waits_fifo_and_is_admitted_after_another_finishes():
    s = make_sched(num_pages=10, page_size=4, max_prefill=1000, chunk=1000)
    big = make_req(30, max_tokens=3)  # 32 tokens -> 8 pages
    s.add(big)
    engine_step(s)
    assert big.status is Status.DECODING
    second = make_req(9, max_tokens=4)  # 12 tokens -> 3 pages; only 2 are available
    small = make_req(1)  # would fit, but must not overtake the head of the queue
    s.add(second)
    s.add(small)
    b = s.schedule()
    assert b.kind == "decode" and [q.req for q in b.seqs] == [big]
    assert list(s.waiting) == [second, small] and second.pages == [] and small.pages == []
    s.computed(b)
    append_token(s, big)
    engine_step(s)  # big's last token
    assert big.status is Status.FINISHED
    b = s.schedule()
    assert b.kind == "prefill" and [q.req for q in b.seqs] == [second, small]
    assert not s.waiting


def test_max_running_limits_admission():
    s = make_sched(num_pages=64, page_size=4, max_running=2, max_prefill=1000, chunk=1000)
    reqs = [make_req(4, max_tokens=5) for _ in range(3)]
    for r in reqs:
        s.add(r)
    b = s.schedule()
    assert [q.req for q in b.seqs] == reqs[:2] and list(s.waiting) == reqs[2:]
    s.computed(b)
    s.finish(reqs[0], "abort")
    b = s.schedule()
    assert b.kind == "prefill" and [q.req for q in b.seqs] == reqs[2:]


def test_hold_for_adopt_returns_none_when_short_and_pages_when_not():
    s = make_sched(num_pages=10, page_size=4, max_prefill=1000, chunk=1000)
    hog = make_req(4, max_tokens=25)  # 1 page; 24 more tokens at most, estimated 17 -> 5 pages
    s.add(hog)
    engine_step(s)
    assert s.estimated_pages() == 5  # so 10 - 1 - 5 = 4 pages are admissible
    before = (s.allocator.num_free, s.reserved)
    r = make_req(10, max_tokens=3, mode=Mode.ADOPTED)  # 3 pages; + ceil(2 * .7) tokens: 3
    r2 = make_req(10, max_tokens=10, mode=Mode.ADOPTED)  # 3 pages; + ceil(9 * .7) tokens: 5
    assert s.hold_for_adopt(r2) is None
    assert (s.allocator.num_free, s.reserved) == before and r2.pages == [] and r2.reserved == 0
    pages = s.hold_for_adopt(r)
    assert pages is not None and pages == r.pages and len(pages) == 3  # pages_for(10, 4)
    assert r.status is Status.HELD and s.held[r.request_id] is r
    assert s.hold_for_adopt(make_req(5, mode=Mode.ADOPTED)) is None  # 1 admissible page left
    assert s.num_running == 2
    s.adopt(r)
    assert r.status is Status.DECODING and r.num_computed == 10
    append_token(s, r)
    b = s.schedule()
    assert b.kind == "decode" and {q.req for q in b.seqs} == {hog, r}
    s.finish(hog, "abort")
    assert s.hold_for_adopt(r2) is not None


def test_hold_for_adopt_respects_max_running():
    s = make_sched(num_pages=64, max_running=1)
    a = make_req(4, max_tokens=2, mode=Mode.ADOPTED)
    b = make_req(4, max_tokens=2, mode=Mode.ADOPTED)
    assert s.hold_for_adopt(a) is not None
    assert s.hold_for_adopt(b) is None  # a held ADOPTED request counts as running
    s.finish(a, "abort")
    assert s.hold_for_adopt(b) is not None


def test_prefill_only_is_held_after_prefill_and_released_by_finish():
    s = make_sched(num_pages=16, page_size=4, max_prefill=8, chunk=8)
    r = make_req(20, max_tokens=50, mode=Mode.PREFILL_ONLY)  # only the prompt's KV: 5 pages
    s.add(r)
    steps = 0
    while s.has_work():
        engine_step(s)
        steps += 1
    assert steps == 3 and r.status is Status.HELD and s.held[r.request_id] is r
    assert r.output_ids == [FAKE_TOKEN] and r.num_computed == 20
    assert len(r.pages) == 5 and r.reserved == 0 and s.reserved == 0
    assert s.schedule() is None
    s.finish(r, "length")
    assert r.status is Status.FINISHED and not s.held
    assert s.allocator.num_free == 16


def test_can_ever_fit_looks_at_the_prompt_only():
    s = make_sched(num_pages=8, page_size=4)  # 32 tokens
    assert s.can_ever_fit(make_req(30, max_tokens=3))
    assert s.can_ever_fit(make_req(30, max_tokens=4))  # runs; ends "length" at the pool's end
    assert s.can_ever_fit(make_req(32, max_tokens=1))
    assert not s.can_ever_fit(make_req(33, max_tokens=1))
    assert s.can_ever_fit(make_req(32, max_tokens=50, mode=Mode.PREFILL_ONLY))
    assert not s.can_ever_fit(make_req(33, max_tokens=1, mode=Mode.PREFILL_ONLY))
    assert s.can_ever_fit(make_req(20, max_tokens=20, mode=Mode.ADOPTED))


def test_request_longer_than_the_pool_ends_with_length_when_the_pool_is_full():
    s = make_sched(num_pages=8, page_size=4, max_prefill=1000, chunk=1000)  # 32 tokens
    r = make_req(20, max_tokens=50)
    s.add(r)
    while s.has_work():
        engine_step(s)
    # the last token's KV is never stored: 20 + 13 - 1 = 32 tokens of KV fill the pool
    assert r.finish_reason == "length" and len(r.output_ids) == 13 and r.num_computed == 32
    assert s.allocator.num_free == 8 and s.reserved == 0


@pytest.mark.parametrize("where", ["waiting", "prefilling", "decoding", "held_prefill",
                                   "held_adopt", "adopted", "finished"])
def test_finish_in_any_state_returns_everything(where):
    s = make_sched(num_pages=32, page_size=2, max_prefill=4, chunk=4)
    mode = {"held_prefill": Mode.PREFILL_ONLY, "held_adopt": Mode.ADOPTED,
            "adopted": Mode.ADOPTED}.get(where, Mode.GENERATE)
    r = make_req(10, max_tokens=5, mode=mode)
    if mode is Mode.ADOPTED:
        assert s.hold_for_adopt(r) is not None
        if where == "adopted":
            s.adopt(r)
            append_token(s, r)
    else:
        s.add(r)
        steps = {"waiting": 0, "prefilling": 1, "decoding": 4, "held_prefill": 3,
                 "finished": 7}[where]
        for _ in range(steps):
            engine_step(s)
    expect = {"waiting": Status.WAITING, "prefilling": Status.PREFILLING,
              "decoding": Status.DECODING, "held_prefill": Status.HELD, "held_adopt": Status.HELD,
              "adopted": Status.DECODING, "finished": Status.FINISHED}[where]
    assert r.status is expect
    s.finish(r, "abort")
    s.finish(r, "abort")  # idempotent
    assert r.status is Status.FINISHED
    assert r.finish_reason == ("length" if where == "finished" else "abort")
    assert r.pages == [] and r.reserved == 0 and s.reserved == 0
    assert s.allocator.num_free == 32 and s.allocator.num_used == 0
    assert not (s.waiting or s.prefilling or s.decoding or s.held) and s.num_running == 0
    assert s.schedule() is None


# -- stateful: random arrivals, steps, adopts, releases and aborts ----------------------------
prompt_lens = st.one_of(st.integers(1, 24), st.integers(1, 200))
max_tokens_st = st.one_of(st.integers(1, 8), st.integers(1, 50))


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(num_pages=st.integers(8, 64), page_size=st.integers(1, 16),
                max_running=st.integers(1, 8), max_prefill=st.integers(1, 64),
                chunk=st.integers(1, 48))
    def setup(self, num_pages, page_size, max_running, max_prefill, chunk):
        self.alloc = PageAllocator(num_pages)
        self.s = Scheduler(self.alloc, page_size, max_running, max_prefill, chunk)
        self.num_pages, self.page_size = num_pages, page_size
        self.max_running, self.max_prefill, self.chunk = max_running, max_prefill, chunk
        self.reqs: list[Request] = []  # every request the scheduler knows (added or held)
        self.pending: list[Request] = []  # ADOPTED, hold_for_adopt said "not yet"

    # -- helpers ------------------------------------------------------------------------------
    def live(self) -> list[Request]:
        return [r for r in self.reqs if r.status is not Status.FINISHED]

    def head_blocked(self) -> bool:
        """The waiting head legitimately can't be admitted now."""
        return not self.s.fits(self.s.waiting[0])

    def stalled(self) -> bool:
        """Decoding may wait only for pages HELD for a transfer (adopt or release frees them)."""
        return any(r.pages for r in self.s.held.values())

    def try_hold(self, r: Request) -> bool:
        before = (self.alloc.num_free, self.s.reserved, self.s.num_running)
        pages = self.s.hold_for_adopt(r)
        if pages is None:
            assert (self.alloc.num_free, self.s.reserved, self.s.num_running) == before
            assert r.pages == [] and r.reserved == 0
            assert self.s.waiting or not self.s.fits(r), "hold refused though it fits"
            return False
        assert pages == r.pages and len(pages) == pages_for(r.prompt_len, self.page_size)
        assert r.status is Status.HELD and self.s.held[r.request_id] is r
        self.reqs.append(r)
        return True

    def do_adopt(self, r: Request) -> None:
        self.s.adopt(r)
        assert r.status is Status.DECODING and r.num_computed == r.prompt_len
        append_token(self.s, r)  # the prefill worker's first token

    def step_once(self) -> Batch | None:
        s = self.s
        waiting_before = list(s.waiting)
        decoding_before = list(s.decoding)
        computed_before = {r: r.num_computed for r in self.live()}
        batch = s.schedule()
        if batch is None:
            assert not s.prefilling, "prefill left but nothing scheduled"
            assert not s.decoding or self.stalled(), "decode left but nothing scheduled"
            assert s.stalled == bool(s.decoding)
            assert not s.waiting or self.head_blocked(), "waiting head could be admitted"
            return None
        seqs = batch.seqs
        assert not s.stalled
        assert seqs and len({id(q.req) for q in seqs}) == len(seqs), "request scheduled twice"
        assert s.num_running <= self.max_running
        if batch.kind == "prefill":
            assert batch.num_tokens <= self.max_prefill, "prefill budget exceeded"
            admitted = [q.req for q in seqs if q.req in waiting_before]
            assert admitted == waiting_before[:len(admitted)], "admission not FIFO"
            assert list(s.waiting) == waiting_before[len(admitted):]
            if s.waiting and batch.num_tokens < self.max_prefill:
                assert self.head_blocked(), "waiting head could be admitted"
            for q in seqs:
                r = q.req
                assert 1 <= q.length <= self.chunk, "chunk too large"
                first = self.admitted_start(r) if r in waiting_before else computed_before[r]
                assert q.start == first == r.num_computed
                assert q.start + q.length <= r.prefill_target
                last = q.start + q.length == r.prefill_target
                assert q.sample == (last and not r.output_ids), "a recompute must not sample"
                assert r.status is Status.PREFILLING
                assert len(r.pages) == pages_for(q.start + q.length, self.page_size)
        else:
            assert batch.kind == "decode"
            retracted = [r for r in decoding_before if r not in s.decoding]
            assert [q.req for q in seqs] == s.decoding == [
                r for r in decoding_before if r not in retracted]
            # fewest generated tokens first, then newest; each goes to the queue head
            order = sorted(decoding_before, key=lambda r: (
                len(r.output_ids), -decoding_before.index(r)))[:len(retracted)]
            assert set(map(id, order)) == set(map(id, retracted))
            assert list(s.waiting)[:len(order)] == order[::-1]
            for r in retracted:
                assert r.status is Status.WAITING and r.pages == [] and r.num_computed == 0
            for q in seqs:
                r = q.req
                assert (q.length, q.sample) == (1, True) and q.start == r.num_computed
                assert q.start == r.num_tokens - 1  # the last sampled token's KV
                assert len(r.pages) == pages_for(q.start + 1, self.page_size)
        s.computed(batch)
        for q in seqs:
            assert q.req.num_computed == q.start + q.length
            if batch.kind == "prefill" and q.start + q.length == q.req.prefill_target:
                want = Status.HELD if q.req.mode is Mode.PREFILL_ONLY else Status.DECODING
                assert q.req.status is want
            if q.sample:
                append_token(s, q.req)
        return batch

    def admitted_start(self, r: Request) -> int:
        """Where a just-admitted request's prefill starts (after its cached prefix)."""
        return 0

    # -- rules --------------------------------------------------------------------------------
    @rule(prompt_len=prompt_lens, max_tokens=max_tokens_st, mode=st.sampled_from(list(Mode)))
    def arrive(self, prompt_len, max_tokens, mode):
        r = make_req(prompt_len, max_tokens, mode)
        fits = pages_for(prompt_len, self.page_size) <= self.num_pages
        assert self.s.can_ever_fit(r) == fits
        if not fits:
            return  # the engine rejects it up front
        if mode is Mode.ADOPTED:
            if not self.try_hold(r):
                self.pending.append(r)
        else:
            self.s.add(r)
            assert r.status is Status.WAITING and self.s.waiting[-1] is r
            self.reqs.append(r)

    @precondition(lambda self: self.pending)
    @rule()
    def retry_holds(self):
        for r in list(self.pending):
            if self.try_hold(r):
                self.pending.remove(r)

    @rule(n=st.integers(1, 8))
    def step(self, n):
        for _ in range(n):
            self.step_once()

    @rule(i=st.integers(0, 1000))
    def adopt(self, i):
        held = [r for r in self.s.held.values() if r.mode is Mode.ADOPTED]
        if held:
            self.do_adopt(held[i % len(held)])

    @rule(i=st.integers(0, 1000))
    def release(self, i):
        held = [r for r in self.s.held.values() if r.mode is Mode.PREFILL_ONLY]
        if held:
            r = held[i % len(held)]
            assert r.num_computed == r.prompt_len and r.output_ids == [FAKE_TOKEN]
            self.s.finish(r, "length")

    @precondition(lambda self: any(r.status is not Status.FINISHED for r in self.reqs))
    @rule(i=st.integers(0, 1000), state=st.sampled_from(list(Status)))
    def abort(self, i, state):
        live = self.live()
        in_state = [r for r in live if r.status is state] or live  # prefer the drawn state
        r = in_state[i % len(in_state)]
        self.s.finish(r, "abort")
        assert r.status is Status.FINISHED and r.finish_reason == "abort"
        assert r.pages == [] and r.reserved == 0

    @precondition(lambda self: self.pending)
    @rule(i=st.integers(0, 1000))
    def abort_pending(self, i):
        self.pending.pop(i % len(self.pending))  # never reached the scheduler

    @precondition(lambda self: any(r.status is Status.FINISHED for r in self.reqs))
    @rule(i=st.integers(0, 1000))
    def finish_finished_is_noop(self, i):
        done = [r for r in self.reqs if r.status is Status.FINISHED]
        r = done[i % len(done)]
        reason, before = r.finish_reason, (self.alloc.num_free, self.s.reserved)
        self.s.finish(r, "abort")
        assert r.finish_reason == reason and (self.alloc.num_free, self.s.reserved) == before

    # -- invariants ---------------------------------------------------------------------------
    @invariant()
    def accounting(self):
        if not hasattr(self, "s"):
            return
        s, a = self.s, self.alloc
        a.check()
        live = self.live()
        self.check_pool(live)
        assert s.reserved == sum(r.reserved for r in live)
        assert all(r.reserved >= 0 for r in live)
        assert s.num_running <= self.max_running
        # each request is where its status says, exactly once
        assert sorted(map(id, s.waiting)) == sorted(  # (retracted ones go to the head)
            id(r) for r in live if r.status is Status.WAITING)
        assert sorted(map(id, s.prefilling)) == sorted(
            id(r) for r in live if r.status is Status.PREFILLING)
        assert sorted(map(id, s.decoding)) == sorted(
            id(r) for r in live if r.status is Status.DECODING)
        assert sorted(s.held) == sorted(r.request_id for r in live if r.status is Status.HELD)
        for r in live:
            have = len(r.pages)
            if r.status is Status.WAITING:
                assert (have, r.reserved, r.num_computed) == (0, 0, 0)
                continue
            # admission reserved exactly the prefill's pages; decode pages are never reserved
            assert have + r.reserved == pages_for(r.prefill_target, self.page_size) or (
                r.status is Status.DECODING and r.reserved == 0)
            if r.status is Status.HELD and r.mode is Mode.ADOPTED:
                assert have == pages_for(r.prompt_len, self.page_size)
                assert r.output_ids == []
                continue
            assert have == pages_for(r.num_computed, self.page_size), "pages not lazy/exact"
            assert have * self.page_size >= r.num_computed
            if r.status is Status.PREFILLING:
                assert 0 < r.num_computed < r.prefill_target
                assert r.output_ids == [] or r.retractions > 0
            elif r.status is Status.HELD:  # PREFILL_ONLY, prompt done
                assert r.mode is Mode.PREFILL_ONLY and r.num_computed == r.prompt_len
                assert len(r.output_ids) == 1
            else:  # decoding: every token but the last sampled one has KV
                assert r.num_computed == r.num_tokens - 1 >= r.prompt_len
                assert 1 <= len(r.output_ids) < r.params.max_tokens
                assert not s.out_of_room(r)
        for r in self.reqs:
            if r.status is Status.FINISHED:
                assert r.pages == [] and r.reserved == 0

    def check_pool(self, live: list[Request]) -> None:
        """Every page is free or owned by exactly one live request; reservations backed."""
        a = self.alloc
        owned = [p for r in live for p in r.pages]
        assert len(owned) == len(set(owned)), "page owned by two requests"
        assert not (set(owned) & set(a._free)), "owned page is on the free list"
        assert set(owned) | set(a._free) == set(range(self.num_pages)), "page leaked"
        assert a.num_used == len(owned)
        assert a.num_free >= self.s.reserved, "reservation not backed by free pages"

    # -- liveness -----------------------------------------------------------------------------
    def teardown(self):
        if not hasattr(self, "s"):
            return
        s = self.s
        todo = self.live() + self.pending
        bound = sum(r.prompt_len + r.params.max_tokens for r in todo) + len(todo) + 2
        longest = max((r.prompt_len + r.params.max_tokens for r in todo), default=0)
        steps, retracted_before = 0, s.num_retracted
        while True:
            steps += 1
            # each retraction may cost a recompute: one prefill step per token at worst
            allowed = bound + (s.num_retracted - retracted_before) * longest
            assert steps <= allowed, f"not drained within {allowed} steps"
            progress = False
            for r in list(self.pending):  # the decode side keeps retrying its holds
                if self.try_hold(r):
                    self.pending.remove(r)
                    progress = True
            for r in [r for r in s.held.values() if r.mode is Mode.ADOPTED]:
                self.do_adopt(r)  # the KV arrives
                progress = True
            if s.has_work() and self.step_once() is not None:
                progress = True
            self.accounting()
            if progress:
                continue
            held = [r for r in s.held.values() if r.mode is Mode.PREFILL_ONLY]
            if held:  # only pages kept for a transfer may block the queue: send one
                s.finish(held[0], "length")
                continue
            assert not s.has_work() and not self.pending, "stuck with nothing held"
            break
        assert not s.held and not s.waiting and not s.prefilling and not s.decoding
        s.flush_cache()  # (with a prefix cache) its unreferenced pages go back
        assert self.alloc.num_free == self.num_pages and self.alloc.num_used == 0
        assert s.reserved == 0 and s.num_running == 0
        for r in self.reqs:
            assert r.status is Status.FINISHED and r.pages == [] and r.reserved == 0
            if r.finish_reason == "abort":
                continue
            assert r.finish_reason == "length"
            if r.mode is Mode.PREFILL_ONLY:
                assert r.output_ids == [FAKE_TOKEN] and r.num_computed == r.prompt_len
            else:
                assert len(r.output_ids) == r.params.max_tokens or s.out_of_room(r)
                assert r.num_computed == r.num_tokens - 1


SchedulerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None, report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestSchedulerMachine = SchedulerMachine.TestCase
