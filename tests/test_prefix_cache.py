"""Prefix cache without a model: the radix tree and its refcounted pages (prefix_cache.py),
and the scheduler with a cache (shared pages, eviction, admission counting only uncached
pages). Exactness of the tokens with a model: tests/test_prefix_cache_engine.py."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize,
                                 invariant, precondition, rule)

from pdmesh.runtime.allocator import OutOfPages, PageAllocator
from pdmesh.runtime.prefix_cache import PrefixCache
from pdmesh.runtime.request import Mode, Request, Status
from pdmesh.runtime.sampling_params import SamplingParams
from pdmesh.runtime.scheduler import Scheduler, pages_for
from test_scheduler import SchedulerMachine, engine_step, max_tokens_st

_ids = itertools.count()


def toks(*chunks: int, ps: int = 2) -> list[int]:
    """A token list made of page-sized chunks: chunk c is [c] * ps."""
    return [c for c in chunks for _ in range(ps)]


# -- the tree alone ---------------------------------------------------------------------------
def test_match_insert_release_and_lru_eviction():
    a = PageAllocator(8)
    c = PrefixCache(a, page_size=2)
    p1 = a.alloc(3)
    path: list = []
    assert c.insert(toks(1, 2, 3) + [9], p1 + [], path) == 3  # the partial page never enters
    assert [n.page for n in path] == p1 and c.num_pages == 3 and c.num_evictable == 0
    assert [n.page for n in c.match(toks(1, 2, 4), 10)] == p1[:2]
    assert [n.page for n in c.match(toks(1, 2, 3), 2)] == p1[:2]  # max_pages
    assert c.match(toks(2), 10) == []
    c.release(path)
    assert c.num_evictable == 3 and a.num_free == 5  # kept, not freed
    c.check()
    # a second branch, used later: the first branch's leaf is the oldest
    m = c.match(toks(1, 2), 10)
    c.acquire(m)
    p2 = a.alloc(1)
    c.insert(toks(1, 2, 5), m and [n.page for n in m] + p2, m)
    c.release(m)
    c.check()
    assert c.evict(1) == 1 and c.match(toks(1, 2, 3), 10)[-1].page == p1[1]  # 3 went first
    assert c.flush() == 3 and c.num_pages == 0 and a.num_free == 8
    c.check()


def test_pinned_pages_are_never_evicted_and_alloc_says_so():
    a = PageAllocator(3)
    c = PrefixCache(a, page_size=1)
    path: list = []
    c.insert([1, 2, 3], a.alloc(3), path)  # held: ref 1 each
    with pytest.raises(OutOfPages):
        c.alloc(1)
    c.release(path[2:])  # not a path from the root, but a valid drop of the leaf's ref
    assert c.alloc(1) == [path[2].page] and c.num_pages == 2
    c.check()


def test_duplicate_insert_keeps_the_first_page():
    a = PageAllocator(4)
    c = PrefixCache(a, page_size=2)
    x, y = [], []
    c.insert(toks(1, 2), a.alloc(2), x)
    assert c.insert(toks(1, 2), a.alloc(2), y) == 0 and y == []  # y's pages stay private
    c.check()


# -- the refcounted pool + tree, as a state machine ---------------------------------------------
class PoolTreeMachine(RuleBasedStateMachine):
    """Users take cached prefixes, allocate private pages, insert them, release; the pool
    allocates with eviction. Model: each user's held nodes and private pages."""

    users = Bundle("users")

    @initialize(num_pages=st.integers(1, 24), page_size=st.integers(1, 3))
    def setup(self, num_pages, page_size):
        self.a = PageAllocator(num_pages)
        self.c = PrefixCache(self.a, page_size)
        self.ps, self.n = page_size, num_pages
        self.live: dict[int, dict] = {}

    def tokens(self, chunks: list[int]) -> list[int]:
        return [t for ch in chunks for t in [ch] * self.ps]

    @rule(target=users, chunks=st.lists(st.integers(0, 2), min_size=1, max_size=6),
          extra=st.integers(0, 3))
    def start(self, chunks, extra):
        """A request: match its prefix, pin it, allocate the rest (evicting as needed)."""
        tokens = self.tokens(chunks)
        path = self.c.match(tokens, len(chunks))
        need = len(chunks) - len(path) + extra
        pinned = self.c.count_unreferenced(path)
        fits = need + pinned <= self.a.num_free + self.c.num_evictable
        free_before = self.a.num_free + self.c.num_evictable
        if not fits:
            return None
        self.c.acquire(path)
        assert self.a.num_free + self.c.num_evictable == free_before - pinned
        pages = [n.page for n in path] + self.c.alloc(need)
        uid = next(_ids)
        self.live[uid] = {"tokens": tokens, "pages": pages, "path": list(path)}
        return uid

    @rule(uid=users)
    def insert(self, uid):
        u = self.live.get(uid)
        if u is not None:
            self.c.insert(u["tokens"], u["pages"], u["path"])

    @rule(uid=consumes(users), keep=st.booleans())
    def finish(self, uid, keep):
        u = self.live.pop(uid, None)
        if u is None:
            return
        if keep:
            self.c.insert(u["tokens"], u["pages"], u["path"])
        self.c.release(u["path"])
        self.a.free(u["pages"][len(u["path"]):])

    @rule(n=st.integers(0, 30))
    def evict(self, n):
        referenced = {p for u in self.live.values() for p in u["pages"]}
        ev = self.c.num_evictable
        got = self.c.evict(n)
        assert got == min(n, ev)
        assert not (referenced & set(self.a._free)), "evicted a referenced page"

    @invariant()
    def consistent(self):
        if not hasattr(self, "c"):
            return
        a, c = self.a, self.c
        a.check()
        c.check()
        tree = {n.page: n for n in c.nodes()}
        private = [p for u in self.live.values() for p in u["pages"][len(u["path"]):]]
        assert len(private) == len(set(private)) and not (set(private) & set(tree))
        assert len(private) + len(tree) + a.num_free == self.n, "page leaked"
        for node in tree.values():  # the ref count is the number of users holding it
            assert node.ref == sum(1 for u in self.live.values()
                                   if any(m is node for m in u["path"]))
        for u in self.live.values():
            assert u["pages"][:len(u["path"])] == [m.page for m in u["path"]]
            for i, m in enumerate(u["path"]):  # a shared page holds these very tokens
                assert m.key == tuple(u["tokens"][i * self.ps:(i + 1) * self.ps])
                assert tree.get(m.page) is m
            assert not (set(u["pages"]) & set(a._free)), "a referenced page is free"

    def teardown(self):
        if not hasattr(self, "c"):
            return
        for uid in list(self.live):
            self.finish(uid, keep=True)
        self.c.flush()
        self.consistent()
        assert self.a.num_free == self.n and self.c.num_pages == 0 == self.c.num_evictable


PoolTreeMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestPoolTreeMachine = PoolTreeMachine.TestCase


# -- the scheduler with a cache ----------------------------------------------------------------
def make_cached(num_pages=32, page_size=4, max_running=8, max_prefill=64, chunk=32):
    a = PageAllocator(num_pages)
    return Scheduler(a, page_size, max_running, max_prefill, chunk,
                     cache=PrefixCache(a, page_size))


def req(ids: list[int], max_tokens=2, mode=Mode.GENERATE) -> Request:
    return Request(f"q{next(_ids)}", ids, SamplingParams(max_tokens=max_tokens), mode=mode)


def drain(s: Scheduler) -> None:
    while s.has_work():
        assert engine_step(s) is not None


def test_second_request_starts_after_the_cached_prefix_and_reserves_only_the_rest():
    s = make_cached(num_pages=32, page_size=4)
    a = req(list(range(18)))
    s.add(a)
    drain(s)
    assert s.cache.num_pages == 4 + 0  # 18 prompt + 1 computed output token: 4 full pages
    b = req(list(range(16)) + [99, 98, 97])
    s.add(b)
    batch = s.schedule()
    (q,) = batch.seqs
    assert (q.start, q.length) == (16, 3) and b.cached_tokens == 16
    assert len(b.cache_nodes) == 4 and b.reserved == 0 and len(b.pages) == 5
    drain(s)
    # the whole prompt cached: the last page is recomputed (its logits are needed)
    c = req(list(range(16)))
    s.add(c)
    (q,) = s.schedule().seqs
    assert (q.start, q.length) == (12, 4) and c.cached_tokens == 12
    drain(s)
    assert s.flush_cache() > 0 and s.allocator.num_free == 32


def test_evictable_pages_count_as_free_for_admission():
    s = make_cached(num_pages=8, page_size=4)
    for base in (0, 100):  # two prompts of 4 full pages (+1 partial) each
        s.add(req(list(range(base, base + 16)) + [1], max_tokens=1))
        drain(s)
    # the second evicted the first's last page (LRU leaf) to get its 5 pages
    assert (s.allocator.num_free, s.cache.num_evictable, s.cache.evicted) == (1, 7, 1)
    r = req(list(range(200, 228)), max_tokens=1)  # 7 pages: only by evicting
    s.add(r)
    drain(s)
    assert r.finish_reason == "length" and s.cache.evicted >= 7


def test_adopted_requests_bypass_the_cache():
    s = make_cached()
    s.add(req(list(range(16)) + [5]))
    drain(s)
    r = req(list(range(16)) + [5], mode=Mode.ADOPTED)
    pages = s.hold_for_adopt(r)
    assert len(pages) == 5 and r.cache_nodes == [] and r.cached_tokens == 0
    s.finish(r, "abort")
    assert s.cache.num_pages == 4  # nothing of r entered the tree


class CachedSchedulerMachine(SchedulerMachine):
    """SchedulerMachine with a prefix cache: prompts drawn from a few shared prefixes."""

    @initialize(num_pages=st.integers(8, 64), page_size=st.integers(1, 8),
                max_running=st.integers(1, 8), max_prefill=st.integers(1, 64),
                chunk=st.integers(1, 48))
    def setup(self, num_pages, page_size, max_running, max_prefill, chunk):
        super().setup(num_pages, page_size, max_running, max_prefill, chunk)
        self.s.cache = PrefixCache(self.alloc, page_size)

    @rule(family=st.integers(0, 2), prompt_len=st.integers(1, 40), tail=st.integers(0, 3),
          max_tokens=max_tokens_st, mode=st.sampled_from(list(Mode)))
    def arrive_shared(self, family, prompt_len, tail, max_tokens, mode):
        """A prompt from one of three families: long shared prefixes, differing tails."""
        tail = min(tail, prompt_len - 1)
        ids = [family * 1000 + i for i in range(prompt_len - tail)] + [7000 + tail] * tail
        r = Request(f"c{next(_ids)}", ids, SamplingParams(max_tokens=max_tokens), mode=mode)
        if not self.s.can_ever_fit(r):
            return
        if mode is Mode.ADOPTED:
            if not self.try_hold(r):
                self.pending.append(r)
        else:
            self.s.add(r)
            self.reqs.append(r)

    def admitted_start(self, r: Request) -> int:
        path = r.cache_nodes
        assert len(path) <= (r.prefill_target - 1) // self.page_size
        return len(path) * self.page_size

    def head_blocked(self) -> bool:
        head = self.s.waiting[0]
        return not self.s.fits(head, self.s.lookup(head))

    def check_pool(self, live: list[Request]) -> None:
        a, c = self.alloc, self.s.cache
        c.check()
        tree = {n.page: n for n in c.nodes()}
        private = [p for r in live for p in r.pages[len(r.cache_nodes):]]
        assert len(private) == len(set(private)), "private page owned by two requests"
        assert not (set(private) & set(tree)), "private page in the tree"
        assert len(private) + len(tree) + a.num_free == self.num_pages, "page leaked"
        for n in tree.values():
            assert n.ref == sum(1 for r in live for m in r.cache_nodes if m is n)
        ps = self.page_size
        for r in live:
            assert r.pages[:len(r.cache_nodes)] == [m.page for m in r.cache_nodes]
            assert not (set(r.pages) & set(a._free)), "a page in use is free"
            for i, m in enumerate(r.cache_nodes):
                assert tree.get(m.page) is m
                assert m.parent is (r.cache_nodes[i - 1] if i else c.root)
                assert m.key == tuple(r.all_ids((i + 1) * ps)[i * ps:]), "shared wrong KV"
                assert (i + 1) * ps <= r.num_computed or r.status is Status.WAITING
        assert a.num_free + c.num_evictable >= self.s.reserved, "reservation not backed"


CachedSchedulerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None, report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestCachedSchedulerMachine = CachedSchedulerMachine.TestCase
