"""The gateway's approximate prefix tree (services/gateway/prefix_tree.py): insert, match,
splits, LRU eviction of leaves, the size bound, and a hypothesis model check against the
prompts actually inserted."""
from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from pdmesh.services.gateway.prefix_tree import PrefixTree, split


def test_split_cuts_whole_chunks_and_a_short_tail():
    assert split(list(range(10)), 4) == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    assert split([], 4) == []


def test_match_counts_whole_shared_chunks_only():
    t = PrefixTree(chunk_tokens=4)
    a = list(range(10))
    assert t.match(split(a, 4)) == 0
    assert t.insert(split(a, 4)) == 0
    assert t.match(split(a, 4)) == 10  # the same prompt, short tail included
    assert t.match(split(a[:8] + [99, 98], 4)) == 8  # tails differ
    assert t.match(split(a[:6] + [7, 7, 7], 4)) == 4  # second chunk differs
    assert t.match(split([5] + a, 4)) == 0
    assert t.match(split(a + list(range(50, 60)), 4)) == 8  # (8, 9) vs (8, 9, 50, 51)
    assert (t.size, len(t)) == (10, 1)


def test_insert_splits_an_edge_where_prompts_part():
    t = PrefixTree(chunk_tokens=2)
    t.insert(split([1, 2, 3, 4, 5, 6], 2))
    assert t.insert(split([1, 2, 3, 4, 9, 9, 9, 9], 2)) == 4
    assert (t.size, len(t)) == (10, 3)  # (1,2)(3,4) -> (5,6) | (9,9)(9,9)
    assert t.match(split([1, 2, 3, 4, 5, 6], 2)) == 6
    assert t.match(split([1, 2, 3, 4, 9, 9, 9, 9, 1], 2)) == 8
    assert t.insert(split([1, 2], 2)) == 2  # a prefix of what is there: nothing new
    assert (t.size, len(t)) == (10, 4)  # (1,2) | (3,4) split off


def test_eviction_takes_the_least_recently_used_leaf_first():
    t = PrefixTree(max_tokens=12, chunk_tokens=2)
    a, b, c = [1, 1, 2, 2], [1, 1, 3, 3], [1, 1, 4, 4]
    for p in (a, b, c):
        t.insert(split(p, 2))
    assert t.size == 8  # (1,1) shared + three leaves of 2
    t.insert(split(a, 2))  # a is now the most recent
    t.insert(split([7] * 6, 2))  # 14 > 12: evict b's leaf (the oldest), then fits
    assert t.size == 12
    assert t.match(split(b, 2)) == 2 and t.match(split(a, 2)) == 4
    assert t.match(split(c, 2)) == 4 and t.evicted == 2


def test_evicting_every_child_makes_the_parent_a_leaf():
    t = PrefixTree(chunk_tokens=2)
    t.insert(split([1, 1, 2, 2], 2))
    t.insert(split([1, 1, 3, 3], 2))
    assert t.evict(0) == 6  # both leaves, then the shared parent, which became one
    assert t.size == 0 and len(t) == 0 and t.match(split([1, 1], 2)) == 0
    t.insert(split([1, 1], 2))
    assert t.match(split([1, 1, 2, 2], 2)) == 2


def test_size_bound_holds_when_one_prompt_is_larger_than_the_tree():
    t = PrefixTree(max_tokens=8, chunk_tokens=4)
    t.insert(split(list(range(20)), 4))
    assert t.size <= 8
    t.insert(split([1, 2, 3], 4))
    assert t.size == 3 and t.match(split([1, 2, 3], 4)) == 3


def test_heap_of_a_long_running_tree_stays_small():
    t = PrefixTree(max_tokens=1000, chunk_tokens=4)
    for i in range(3000):  # the same few prompts over and over: stale heap entries
        t.insert(split([i % 7] * 12, 4))
    assert len(t._heap) <= 2 * len(t) + 64


def test_insert_and_match_are_linear_in_the_prompt():
    """O(prompt length): 32k-token prompts sharing 30k tokens, 2 ms-ish each."""
    t = PrefixTree(chunk_tokens=16)
    base = list(range(30_000))
    start = time.perf_counter()
    for i in range(20):
        chunks = split(base + [i] * 2000, 16)
        t.match(chunks)
        t.insert(chunks)
    per = (time.perf_counter() - start) / 20
    assert t.match(split(base + [3] * 2000, 16)) == 32_000
    assert t.size == 30_000 + 20 * 2000
    assert per < 0.05, per  # generous: the 2-core box is shared


prompts = st.lists(st.lists(st.integers(0, 3), max_size=24), max_size=30)


@settings(max_examples=200, deadline=None)
@given(prompts, prompts, st.integers(1, 5), st.integers(1, 64))
def test_match_never_exceeds_what_was_inserted_and_the_bound_holds(
        inserted, queries, chunk, max_tokens):
    t = PrefixTree(max_tokens=max_tokens, chunk_tokens=chunk)
    for p in inserted:
        t.insert(split(p, chunk))
        assert t.size <= max_tokens
        assert t.size == _size(t)
    for q in [*queries, *inserted]:
        m = t.match(split(q, chunk))
        best = max((_common(q, p) for p in inserted), default=0)
        assert m <= best  # a match is a prefix some inserted prompt really has
        assert m <= len(q)
    if inserted and len(inserted[-1]) <= max_tokens:
        # the last prompt is the most recent: eviction never took it
        assert t.match(split(inserted[-1], chunk)) == len(inserted[-1])


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _size(t: PrefixTree) -> int:
    """Token ids in the tree, counted by walking it."""
    stack, total = list(t._root.children.values()), 0
    while stack:
        node = stack.pop()
        total += node.tokens
        stack.extend(node.children.values())
    return total
