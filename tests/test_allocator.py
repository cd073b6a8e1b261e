"""PageAllocator: exact accounting, LIFO reuse, and failures that change nothing."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pdmesh.runtime.allocator import OutOfPages, PageAllocator


def snapshot(a: PageAllocator) -> tuple:
    return list(a._free), set(a._used), a.num_free, a.num_used


# -- plain unit tests --------------------------------------------------------------------
def test_rejects_empty_pool():
    with pytest.raises(ValueError):
        PageAllocator(0)
    with pytest.raises(ValueError):
        PageAllocator(-3)


def test_fresh_pool_hands_out_ascending_ids():
    a = PageAllocator(8)
    assert (a.num_free, a.num_used) == (8, 0)
    assert a.alloc(3) == [0, 1, 2]
    assert a.alloc(2) == [3, 4]
    assert (a.num_free, a.num_used) == (3, 5)
    a.check()


def test_alloc_zero_and_negative():
    a = PageAllocator(4)
    assert a.alloc(0) == []
    assert (a.num_free, a.num_used) == (4, 0)
    with pytest.raises(ValueError):
        a.alloc(-1)
    assert (a.num_free, a.num_used) == (4, 0)
    a.check()


def test_freed_pages_are_reused_most_recently_freed_first():
    a = PageAllocator(10)
    pages = a.alloc(6)
    a.free([pages[1]])
    a.free([pages[4]])
    assert a.alloc(1) == [pages[4]]  # freed last, reused first
    assert a.alloc(1) == [pages[1]]
    a.free([2, 3])  # a freed block comes back in the same order
    assert a.alloc(2) == [2, 3]
    assert a.alloc(1) == [6]  # then the never-used pages, ascending
    a.check()


def test_out_of_pages_takes_nothing():
    a = PageAllocator(5)
    a.alloc(3)
    before = snapshot(a)
    with pytest.raises(OutOfPages):
        a.alloc(3)
    assert snapshot(a) == before
    a.check()
    assert sorted(a.alloc(2)) == [3, 4]  # the exact remainder is still there
    with pytest.raises(OutOfPages):
        a.alloc(1)
    a.check()


def test_out_of_pages_is_a_runtime_error():
    assert issubclass(OutOfPages, RuntimeError)


def test_whole_pool_round_trip():
    a = PageAllocator(16)
    pages = a.alloc(16)
    assert sorted(pages) == list(range(16))
    assert (a.num_free, a.num_used) == (0, 16)
    a.free(pages)
    assert (a.num_free, a.num_used) == (16, 0)
    a.check()


def test_double_free_raises_and_changes_nothing():
    a = PageAllocator(6)
    pages = a.alloc(4)
    a.free([pages[0]])
    before = snapshot(a)
    with pytest.raises(ValueError):
        a.free([pages[0]])
    assert snapshot(a) == before
    # a batch mixing a good page with an already-freed one frees neither
    with pytest.raises(ValueError):
        a.free([pages[1], pages[0]])
    assert snapshot(a) == before
    assert pages[1] in a._used
    a.check()


@pytest.mark.parametrize("bad", [6, 100, -1])
def test_unknown_page_raises_and_changes_nothing(bad):
    a = PageAllocator(6)
    pages = a.alloc(3)
    before = snapshot(a)
    with pytest.raises(ValueError):
        a.free([bad])
    with pytest.raises(ValueError):
        a.free([pages[0], bad])
    assert snapshot(a) == before
    a.check()


def test_never_allocated_page_cannot_be_freed():
    a = PageAllocator(6)
    a.alloc(2)  # pages 0, 1
    before = snapshot(a)
    with pytest.raises(ValueError):
        a.free([4])  # a valid id, but free
    assert snapshot(a) == before


def test_duplicate_in_one_free_raises_and_changes_nothing():
    a = PageAllocator(6)
    pages = a.alloc(3)
    before = snapshot(a)
    with pytest.raises(ValueError):
        a.free([pages[0], pages[0]])
    assert snapshot(a) == before
    a.check()
    a.free([pages[0]])  # and a correct free still works afterwards
    a.check()


def test_free_empty_list_is_a_noop():
    a = PageAllocator(3)
    a.alloc(1)
    before = snapshot(a)
    a.free([])
    assert snapshot(a) == before


def test_check_detects_corruption():
    a = PageAllocator(4)
    pages = a.alloc(2)
    a.check()
    a._free.append(pages[0])  # a page both free and used
    with pytest.raises(AssertionError):
        a.check()
    a._free.pop()
    a.check()
    a._free.append(a._free[0])  # a duplicate in the free list
    with pytest.raises(AssertionError):
        a.check()
    a._free.pop()
    a._used.discard(pages[1])  # a lost page
    with pytest.raises(AssertionError):
        a.check()


# -- stateful: random alloc/free sequences -------------------------------------------------
class AllocatorMachine(RuleBasedStateMachine):
    """Model: the blocks each owner holds. The allocator must agree with it after every rule."""

    @initialize(num_pages=st.integers(1, 48))
    def setup(self, num_pages):
        self.a = PageAllocator(num_pages)
        self.num_pages = num_pages
        self.blocks: list[list[int]] = []  # what each owner holds
        self.freed: list[int] = []  # pages given back (some may be in use again)

    def in_use(self) -> set[int]:
        return {p for b in self.blocks for p in b}

    @rule(n=st.integers(0, 50))
    def alloc(self, n):
        free_before = self.a.num_free
        if n > free_before:
            before = snapshot(self.a)
            with pytest.raises(OutOfPages):
                self.a.alloc(n)
            assert snapshot(self.a) == before
            return
        pages = self.a.alloc(n)
        assert len(pages) == n == len(set(pages))
        assert all(0 <= p < self.num_pages for p in pages)
        assert not (set(pages) & self.in_use()), "page handed out twice while in use"
        assert self.a.num_free == free_before - n
        self.blocks.append(pages)

    @precondition(lambda self: self.blocks)
    @rule(i=st.integers(0, 1000), k=st.integers(0, 1000), realloc=st.booleans())
    def free(self, i, k, realloc):
        block = self.blocks[i % len(self.blocks)]
        cut = k % (len(block) + 1)  # free a prefix (maybe empty, maybe all) of the block
        gone, block[:] = block[:cut], block[cut:]
        used_before = self.a.num_used
        self.a.free(gone)
        assert self.a.num_used == used_before - len(gone)
        self.freed.extend(gone)
        if realloc and gone:  # most recently freed first: the same pages come straight back
            again = self.a.alloc(len(gone))
            assert set(again) == set(gone)
            self.blocks.append(again)
        self.blocks = [b for b in self.blocks if b]

    @rule(i=st.integers(0, 1000), kind=st.sampled_from(["freed", "unknown", "dup"]))
    def bad_free(self, i, kind):
        used = self.in_use()
        if kind == "freed":
            candidates = [p for p in self.freed if p not in used]
            if not candidates:
                return
            bad = [candidates[i % len(candidates)]]
        elif kind == "unknown":
            bad = [[-1, self.num_pages, self.num_pages + i][i % 3]]
        else:
            if not used:
                return
            p = sorted(used)[i % len(used)]
            bad = [p, p]
        if used and i % 2:  # put a page that *is* in use first: it must not be freed either
            bad = [min(used)] + bad
        before = snapshot(self.a)
        with pytest.raises(ValueError):
            self.a.free(bad)
        assert snapshot(self.a) == before

    @invariant()
    def accounting(self):
        self.a.check()
        assert self.a.num_free + self.a.num_used == self.num_pages
        used = self.in_use()
        assert sum(len(b) for b in self.blocks) == len(used), "page handed out twice"
        assert self.a._used == used
        assert self.a.num_used == len(used)


AllocatorMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestAllocatorMachine = AllocatorMachine.TestCase
