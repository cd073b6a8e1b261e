"""n > 1 without a model: Scheduler.fork shares a parent's full prompt pages with its
other sequences (runtime/fork.py). A fake engine loop mirrors Engine.step and
Engine._fork: no torch. Checked: the pages are shared, not copied; the group's reference
count is the number of members holding it; the pages are freed exactly once, by the
last release, in any order of endings (finish, abort, retraction); nothing leaks; with
the prefix cache the children share through the tree instead."""
from __future__ import annotations

import itertools

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pdmesh.runtime.allocator import PageAllocator
from pdmesh.runtime.fork import ForkGroup, child_id, fork_seed, member_ids
from pdmesh.runtime.prefix_cache import PrefixCache
from pdmesh.runtime.request import Mode, Request, Status
from pdmesh.runtime.sampling_params import SamplingParams
from pdmesh.runtime.scheduler import Scheduler

PS = 4  # page size
_ids = itertools.count()


def sched(num_pages=64, max_running=16, cache=False) -> Scheduler:
    alloc = PageAllocator(num_pages)
    return Scheduler(alloc, PS, max_running, 256, 64,
                     cache=PrefixCache(alloc, PS) if cache else None)


def parent(prompt_len: int, n: int, max_tokens: int = 3, mode=Mode.ADOPTED) -> Request:
    prompt = [next(_ids) % 1000 for _ in range(prompt_len)]
    return Request(f"r{next(_ids)}", prompt, SamplingParams(max_tokens=max_tokens, n=n,
                                                            seed=5), mode=mode)


def children(p: Request) -> list[Request]:
    """What Engine._child builds (minus the generator and detokenizer)."""
    out = []
    for i in range(1, p.params.n):
        params = SamplingParams(max_tokens=p.params.max_tokens, seed=fork_seed(p.params.seed, i))
        out.append(Request(child_id(p.request_id, i), p.prompt_ids, params, index=i))
    return out


def adopt_forked(s: Scheduler, p: Request) -> list[Request]:
    """hold -> (KV written) -> adopt -> fork, as Engine.adopt does."""
    assert s.hold_for_adopt(p) is not None
    s.adopt(p)
    kids = children(p)
    s.fork(p, kids)
    p.output_ids.append(7)  # the prefill's first token
    return kids


def step(s: Scheduler, forks: list | None = None) -> None:
    """Engine.step: schedule, compute, fork fresh prompts of n > 1, append a token."""
    batch = s.schedule()
    if batch is None:
        return
    s.computed(batch)
    for seq in batch.seqs:
        if not seq.sample:
            continue
        r = seq.req
        if r.params.n > 1 and not r.index and not r.output_ids:
            kids = children(r)
            s.fork(r, kids)
            if forks is not None:
                forks.extend(kids)
        r.output_ids.append(7)
        if len(r.output_ids) >= r.params.max_tokens or s.out_of_room(r):
            s.finish(r, "length")


def run_all(s: Scheduler) -> None:
    for _ in range(200):
        if not s.has_work():
            return
        step(s)
    raise AssertionError("requests never finished")


# -- plain tests ----------------------------------------------------------------------------
def test_ids_and_seeds():
    assert member_ids("42", 3) == ["42", "42/1", "42/2"]
    assert [fork_seed(7, i) for i in range(3)] == [7, 8, 9]
    assert fork_seed(None, 2) is None
    assert fork_seed(2 ** 63 - 1, 1) == -2 ** 63  # wraps within int64
    assert SamplingParams(n=128).n == 128
    for bad in (0, 129):
        try:
            SamplingParams(n=bad)
        except ValueError as e:
            assert "n must be in [1, 128]" in str(e)
        else:
            raise AssertionError(f"n={bad} accepted")


def test_group_counts_references_and_frees_once():
    g = ForkGroup([3, 4], refs=1)
    g.acquire()
    assert g.release() == [] and g.alive
    assert g.release() == [3, 4] and not g.alive
    for op in (g.acquire, g.release):
        try:
            op()
        except ValueError:
            pass
        else:
            raise AssertionError("a dead group was used")


def test_adopted_parent_shares_its_full_prompt_pages():
    s = sched()
    p = parent(prompt_len=14, n=4)  # pages of 4: 3 full before the last token's page
    kids = adopt_forked(s, p)
    g = p.group
    assert g is not None and g.pages == p.pages[:3] and g.refs == 4
    for k in kids:  # admitted at fork time: the shared pages, then their own tail
        assert k.status is Status.PREFILLING and k.group is g and k.group_pages == 3
        assert k.pages == g.pages and k.num_computed == 12 and k.reserved == 1
    # 4 prompt pages for the parent + 1 tail page to come per child; nothing copied
    assert s.allocator.num_used == 4 and s.reserved == 3
    batch = s.schedule()  # the children recompute tokens 12..13 and sample their first
    assert batch.kind == "prefill"
    assert [(q.req, q.start, q.length, q.sample) for q in batch.seqs] == \
        [(k, 12, 2, True) for k in kids]
    tails = {k.pages[3] for k in kids} | {p.pages[3]}
    assert len(tails) == 4  # each its own copy of the last, partial page
    assert s.allocator.num_used == 7
    s.computed(batch)
    for k in kids:
        k.output_ids.append(7)
    run_all(s)
    assert s.allocator.num_free == 64 and not g.alive
    s.allocator.check()


def test_parent_finishing_on_its_first_token_leaves_the_pages_to_the_children():
    s = sched()
    p = parent(prompt_len=9, n=3, max_tokens=1)
    kids = adopt_forked(s, p)
    s.finish(p, "length")  # max_tokens=1: done at adoption
    g = p.group
    assert g.refs == 2 and s.allocator.num_used == 2  # the 2 shared pages stay
    run_all(s)
    assert all(k.finished and len(k.output_ids) == 1 for k in kids)
    assert s.allocator.num_free == 64 and not g.alive


def test_aborts_in_any_order_free_everything_once():
    for order in ([0, 1, 2], [2, 1, 0], [1, 0, 2]):
        s = sched()
        p = parent(prompt_len=10, n=3)
        members = [p, *adopt_forked(s, p)]
        step(s)  # the children's tails
        for i in order:
            s.finish(members[i], "abort")
            s.allocator.check()
        assert s.allocator.num_free == 64, order


def test_children_that_do_not_fit_wait_holding_nothing():
    # the parent's 3 prompt pages + 1 page for the first child's tail fill the pool (4)
    s = sched(num_pages=4)
    p = parent(prompt_len=10, n=3, max_tokens=1)
    kids = adopt_forked(s, p)
    assert kids[0].status is Status.PREFILLING
    assert kids[1].status is Status.WAITING and kids[1].pages == []
    assert list(s.waiting) == [kids[1]]
    s.finish(p, "length")
    run_all(s)  # kids[1] shares the group kids[0] holds, or recomputes the prompt
    assert all(k.finished for k in kids) and s.allocator.num_free == 4


def test_a_child_admitted_after_the_group_died_recomputes_the_prompt():
    s = sched(num_pages=3, max_running=1)  # the parent alone: children wait
    p = parent(prompt_len=9, n=2, max_tokens=1)
    (kid,) = adopt_forked(s, p)
    assert kid.status is Status.WAITING
    s.finish(p, "length")
    assert not p.group.alive and s.allocator.num_free == 3
    batch = s.schedule()
    assert [(q.req, q.start, q.length) for q in batch.seqs] == [(kid, 0, 9)]
    assert kid.group_pages == 0
    s.computed(batch)
    s.finish(kid, "stop")
    assert s.allocator.num_free == 3


def test_retracted_member_gives_back_its_reference_and_shares_again():
    s = sched()
    p = parent(prompt_len=10, n=2, max_tokens=50)
    (kid,) = adopt_forked(s, p)
    step(s)  # kid's tail, first token
    assert kid.status is Status.DECODING
    s.retract(kid)
    assert p.group.refs == 1 and kid.pages == [] and kid.group_pages == 0
    step(s)  # re-admitted: shares the group again, recomputes the rest
    assert kid.group_pages == 2 and p.group.refs == 2
    assert kid.pages[:2] == p.pages[:2]
    s.finish(p, "abort"), s.finish(kid, "abort")
    assert s.allocator.num_free == 64


def test_colocated_parent_forks_at_its_prefill():
    s = sched()
    p = parent(prompt_len=10, n=3, mode=Mode.GENERATE)
    s.add(p)
    kids: list[Request] = []
    step(s, kids)  # the prompt, once; forks before its first token
    assert len(kids) == 2 and p.group is not None and p.group.refs == 3
    assert all(k.pages[:2] == p.pages[:2] for k in kids)
    run_all(s)
    assert s.allocator.num_free == 64


def test_with_the_prefix_cache_children_share_through_the_tree():
    s = sched(cache=True)
    p = parent(prompt_len=10, n=3, mode=Mode.GENERATE)
    s.add(p)
    kids: list[Request] = []
    step(s, kids)
    assert p.group is None and all(k.group is None for k in kids)
    assert [n.ref for n in p.cache_nodes] == [3, 3]  # the parent and both children
    assert all(k.cache_nodes == p.cache_nodes and k.pages[:2] == p.pages[:2] for k in kids)
    run_all(s)
    s.cache.check()
    assert s.flush_cache() >= 2 and s.allocator.num_free == 64


def test_adopted_parent_never_enters_the_cache():
    s = sched(cache=True)
    p = parent(prompt_len=10, n=2)
    (kid,) = adopt_forked(s, p)
    assert p.group is not None and kid.group is p.group
    run_all(s)
    assert s.cache.num_pages == 0 and s.allocator.num_free == 64


# -- random sequences --------------------------------------------------------------------------
class ForkMachine(RuleBasedStateMachine):
    """Random adopted and colocated forks, steps, aborts and retractions on a small pool,
    with and without the prefix cache: the page accounting holds after every rule."""

    @initialize(num_pages=st.integers(6, 40), cache=st.booleans())
    def setup(self, num_pages, cache):
        self.s = sched(num_pages, max_running=6, cache=cache)
        self.reqs: list[Request] = []

    @rule(prompt_len=st.integers(1, 20), n=st.integers(1, 4), max_tokens=st.integers(1, 6),
          adopted=st.booleans())
    def arrive(self, prompt_len, n, max_tokens, adopted):
        p = parent(prompt_len, n, max_tokens, Mode.ADOPTED if adopted else Mode.GENERATE)
        if -(-prompt_len // PS) > self.s.allocator.num_pages:
            return
        if adopted:
            if self.s.hold_for_adopt(p) is None:
                return
            self.s.adopt(p)
            kids = children(p)
            self.s.fork(p, kids)
            self.reqs += [p, *kids]
            p.output_ids.append(7)
            if len(p.output_ids) >= max_tokens:
                self.s.finish(p, "length")
        else:
            self.s.add(p)
            self.reqs.append(p)

    @rule(k=st.integers(1, 4))
    def steps(self, k):
        for _ in range(k):
            step(self.s, self.reqs)

    @rule(i=st.integers(0, 100))
    def abort(self, i):
        if self.reqs:
            self.s.finish(self.reqs[i % len(self.reqs)], "abort")

    @rule(i=st.integers(0, 100))
    def retract(self, i):
        decoding = self.s.decoding
        if len(decoding) > 1:
            self.s.retract(decoding[i % len(decoding)])

    @invariant()
    def accounting(self):
        s = self.s
        s.allocator.check()
        live = [r for r in self.reqs if not r.finished]
        private, groups = [], {}
        for r in live:
            owned = r.group_pages or len(r.cache_nodes)
            private += r.pages[owned:]
            if r.group_pages:
                assert r.pages[:r.group_pages] == r.group.pages
                groups.setdefault(id(r.group), [r.group, 0])[1] += 1
        for g, holders in groups.values():
            assert g.refs == holders, "a group's count is not its holders'"
        shared = [p for g, _ in groups.values() for p in g.pages]
        tree = [n.page for n in s.cache.nodes()] if s.cache else []
        every = private + shared + tree
        assert len(every) == len(set(every)), "a page is owned twice"
        assert set(every) == s.allocator._used, "a used page has no owner (leak)"

    def teardown(self):
        for r in self.reqs:
            self.s.finish(r, "abort")
        self.s.flush_cache()
        assert self.s.allocator.num_free == self.s.allocator.num_pages


TestForkMachine = ForkMachine.TestCase
TestForkMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])
