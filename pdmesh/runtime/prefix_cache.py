"""Prefix cache: a radix tree over token ids at page granularity (plain Python, no torch).

Every node below the root is one full KV page: its key is the page's `page_size` token
ids, its value the page id, its path from the root the tokens before it. Only full pages
are cached (a page's KV depends on every token before it, which the path fixes), so an
edge never splits and the tree is a trie over page-sized chunks.

Reference counts. A request that uses a cached page (matched at admission, or its own
page inserted after its prefill) holds one reference on that node; a request holds
references on a path from the root, so ref(parent) >= ref(child). Pages in the tree are
"used" pages of the PageAllocator; a node with ref 0 is *evictable*: kept for the next
request with the same prefix, and given back to the allocator (leaves first, least
recently used first) only when an allocation finds too few free pages. Since ref 0 at a
node means ref 0 on its whole subtree, every evictable page can be reclaimed, so
admission counts `num_evictable` as free.

Invariants (`check()`): every page is in exactly one of the allocator's free list, the
tree, or some request's private pages; the tree's pages are distinct; `num_evictable`
is the number of nodes with ref 0; ref(parent) >= ref(child); the evictable leaves
(the LRU candidates) are exactly the ref-0 nodes without children.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Sequence

from pdmesh.runtime.allocator import OutOfPages, PageAllocator


class Node:
    __slots__ = ("key", "page", "parent", "children", "ref", "last_use")

    def __init__(self, key: tuple[int, ...], page: int, parent: "Node | None") -> None:
        self.key, self.page, self.parent = key, page, parent
        self.children: dict[tuple[int, ...], Node] = {}
        self.ref = 0
        self.last_use = 0


class PrefixCache:
    """The tree plus its share of the allocator's pages (see the module docstring)."""

    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        self.allocator, self.page_size = allocator, page_size
        self.root = Node((), -1, None)
        self.root.ref = 1  # never evicted
        self.num_pages = 0  # nodes (pages) in the tree
        self.num_evictable = 0  # nodes with ref 0
        # ref-0 leaves -> their last_use when they became one; a heap of (last_use, seq,
        # node) finds the oldest (entries whose node left _lru or was touched are stale)
        self._lru: dict[Node, int] = {}
        self._heap: list[tuple[int, int, Node]] = []
        self._seq = itertools.count()
        self._clock = itertools.count(1)
        self.hits = 0  # pages matched by requests (cumulative)
        self.evicted = 0  # pages given back to the allocator (cumulative)

    # -- lookup --------------------------------------------------------------------------
    def match(self, tokens: Sequence[int], max_pages: int) -> list[Node]:
        """The longest cached path of full pages that prefixes `tokens` (at most
        `max_pages` pages). Takes no reference."""
        ps, node, path = self.page_size, self.root, []
        for i in range(min(max_pages, len(tokens) // ps)):
            node = node.children.get(tuple(tokens[i * ps:(i + 1) * ps]))
            if node is None:
                break
            path.append(node)
        return path

    @staticmethod
    def count_unreferenced(path: Sequence[Node]) -> int:
        """Evictable pages that taking `path` would pin (they stop counting as free)."""
        return sum(1 for n in path if n.ref == 0)

    # -- references ----------------------------------------------------------------------
    def acquire(self, path: Sequence[Node]) -> None:
        """Take one reference on each node of `path` (a path from the root)."""
        t = next(self._clock)
        for n in path:
            if n.ref == 0:
                self.num_evictable -= 1
                self._lru.pop(n, None)
            n.ref += 1
            n.last_use = t
        self.hits += len(path)

    def release(self, path: Sequence[Node]) -> None:
        """Drop one reference on each node of `path`; unreferenced pages stay cached."""
        t = next(self._clock)
        for n in reversed(path):  # deepest first, so a parent sees its child's ref drop
            if n.ref <= 0:
                raise ValueError(f"releasing page {n.page}, which has no reference")
            n.ref -= 1
            n.last_use = t
            if n.ref == 0:
                self.num_evictable += 1
                if not n.children:
                    self._candidate(n)
            parent = n.parent
            if parent is not None and parent is not self.root and parent.ref == 0:
                self._lru.pop(parent, None)  # has a child: not a leaf candidate

    def insert(self, tokens: Sequence[int], pages: Sequence[int], path: list[Node]) -> int:
        """Extend `path` (the nodes a request holds references on, a path from the root
        over its first pages) with the request's next full pages of `tokens`, each held
        by the request (ref 1). Stops at the first page another request already cached
        under the same tokens (that page of ours stays private). Returns pages added."""
        ps = self.page_size
        node = path[-1] if path else self.root
        added = 0
        t = next(self._clock)
        for i in range(len(path), min(len(tokens) // ps, len(pages))):
            key = tuple(tokens[i * ps:(i + 1) * ps])
            if key in node.children:
                break
            child = Node(key, pages[i], node)
            child.ref, child.last_use = 1, t
            node.children[key] = child
            self._lru.pop(node, None)  # no longer a leaf
            path.append(child)
            node = child
            added += 1
        self.num_pages += added
        return added

    # -- eviction ------------------------------------------------------------------------
    def evict(self, n: int) -> int:
        """Give back up to `n` unreferenced pages to the allocator, least recently used
        leaves first (a parent becomes a candidate once its children are gone)."""
        freed: list[int] = []
        while len(freed) < n and self._lru:
            last_use, _, leaf = heapq.heappop(self._heap)
            if self._lru.get(leaf) != last_use:
                continue  # stale entry
            del self._lru[leaf]
            parent = leaf.parent
            del parent.children[leaf.key]
            freed.append(leaf.page)
            self.num_pages -= 1
            self.num_evictable -= 1
            if parent is not self.root and parent.ref == 0 and not parent.children:
                self._candidate(parent)
        if freed:
            self.allocator.free(freed)
            self.evicted += len(freed)
        return len(freed)

    def _candidate(self, n: Node) -> None:
        self._lru[n] = n.last_use
        heapq.heappush(self._heap, (n.last_use, next(self._seq), n))
        if len(self._heap) > 4 * len(self._lru) + 64:  # drop stale entries
            self._heap = [e for e in self._heap if self._lru.get(e[2]) == e[0]]
            heapq.heapify(self._heap)

    def alloc(self, n: int) -> list[int]:
        """Allocate `n` pages, evicting unreferenced cached pages if too few are free."""
        short = n - self.allocator.num_free
        if short > 0 and self.evict(short) < short:
            raise OutOfPages(f"asked for {n} pages, {self.allocator.num_free} free and "
                             f"nothing left to evict")
        return self.allocator.alloc(n)

    def flush(self) -> int:
        """Evict every unreferenced page; returns how many."""
        return self.evict(self.num_evictable)

    # -- checking ------------------------------------------------------------------------
    def nodes(self) -> list[Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out

    def check(self) -> None:
        """Assert the tree's invariants (tests call it after every operation)."""
        nodes = self.nodes()
        pages = [n.page for n in nodes]
        assert len(pages) == len(set(pages)) == self.num_pages, "tree pages inconsistent"
        assert set(pages) <= self.allocator._used, "a cached page is not allocated"
        assert sum(1 for n in nodes if n.ref == 0) == self.num_evictable, "evictable count"
        for n in nodes:
            assert n.ref >= 0
            assert n.parent is self.root or n.parent.ref >= n.ref, "ref(parent) < ref(child)"
            assert n.parent.children.get(n.key) is n
            assert len(n.key) == self.page_size
        leaves = {n for n in nodes if n.ref == 0 and not n.children}
        assert leaves == set(self._lru), "LRU candidates are not the unreferenced leaves"
