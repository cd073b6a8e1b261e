"""An approximate radix tree of the prompts routed to one worker (cache-aware routing).

The gateway cannot see a worker's prefix cache, so it keeps, per worker, the token ids of
the prompts it sent there and asks "how long a prefix of this prompt did that worker see
lately?" (SGLang Model Gateway's cache_aware policy keeps the same approximate tree).

Granularity: a prompt is cut into chunks of `chunk_tokens` ids (the last one may be
shorter), and the tree's edges are runs of whole chunks, children keyed by their first
chunk. A match therefore counts whole chunks only, like a worker's page-granular prefix
cache, and never more tokens than the prompts really share. Matching and inserting cost
O(prompt length): one tuple per chunk, one dict lookup or tuple compare per chunk.

Size bound: the tree holds at most `max_tokens` token ids. An insert that exceeds it
evicts least-recently-used leaves (whole edges) until it fits again. Every node on an
inserted path is stamped with a logical clock, so a parent is never older than its
children and the oldest leaf is the LRU one; a heap with lazy deletion finds it.

Plain Python, not thread-safe: the WorkerPool calls its policies under its lock.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Sequence

Chunk = tuple[int, ...]


def split(tokens: Sequence[int], chunk_tokens: int) -> list[Chunk]:
    """`tokens` cut into tuples of `chunk_tokens` ids (the last may be shorter)."""
    return [tuple(tokens[i:i + chunk_tokens]) for i in range(0, len(tokens), chunk_tokens)]


class _Node:
    __slots__ = ("chunks", "tokens", "children", "parent", "stamp", "alive")

    def __init__(self, chunks: list[Chunk], parent: _Node | None, stamp: int) -> None:
        self.chunks = chunks  # the edge from the parent: whole chunks
        self.tokens = sum(map(len, chunks))
        self.children: dict[Chunk, _Node] = {}
        self.parent = parent
        self.stamp = stamp  # last insert through this node (logical clock)
        self.alive = True


class PrefixTree:
    """Prompts seen by one worker, bounded to `max_tokens` token ids with LRU eviction.

    `match(chunks)` -> tokens of the longest stored prefix; `insert(chunks)` stores a
    prompt (and evicts if needed). Both take `split(tokens, chunk_tokens)`, so that one
    split serves every worker's tree."""

    def __init__(self, max_tokens: int = 1 << 26, chunk_tokens: int = 16) -> None:
        if max_tokens < 1 or chunk_tokens < 1:
            raise ValueError("max_tokens and chunk_tokens must be >= 1")
        self.max_tokens, self.chunk_tokens = max_tokens, chunk_tokens
        self._clock = itertools.count(1)
        self._root = _Node([], None, 0)
        self._heap: list[tuple[int, int, _Node]] = []  # (stamp, tiebreak, leaf), lazy
        self._tiebreak = itertools.count()
        self._nodes = 0
        self.size = 0  # token ids stored
        self.evicted = 0  # token ids evicted so far

    def __len__(self) -> int:
        """Nodes in the tree (the root not counted)."""
        return self._nodes

    def match(self, chunks: Sequence[Chunk]) -> int:
        """Token ids of the longest prefix of `chunks` stored here (read-only)."""
        node, i, matched = self._root, 0, 0
        while i < len(chunks):
            child = node.children.get(chunks[i])
            if child is None:
                break
            n = _common(child.chunks, chunks, i)
            matched += sum(len(c) for c in child.chunks[:n]) if n < len(child.chunks) \
                else child.tokens
            i += n
            if n < len(child.chunks):
                break
            node = child
        return matched

    def insert(self, chunks: Sequence[Chunk]) -> int:
        """Store the prompt `chunks`, stamping its path most recent; evict LRU leaves
        while the tree holds more than max_tokens. Returns the tokens that were already
        stored (the match before the insert)."""
        stamp = next(self._clock)
        node, i, matched = self._root, 0, 0
        while i < len(chunks):
            child = node.children.get(chunks[i])
            if child is None:
                leaf = _Node(list(chunks[i:]), node, stamp)
                node.children[chunks[i]] = leaf
                self._nodes += 1
                self.size += leaf.tokens
                node = leaf
                break
            n = _common(child.chunks, chunks, i)
            if n < len(child.chunks):
                child = self._split(child, n)
            child.stamp = stamp
            matched += child.tokens
            i += n
            node = child
        if not node.children and node is not self._root:
            self._push(node)
        self._evict_to(self.max_tokens)
        if len(self._heap) > 2 * self._nodes + 64:
            self._rebuild_heap()
        return matched

    def evict(self, target_tokens: int) -> int:
        """Evict LRU leaves until at most `target_tokens` remain; returns tokens evicted."""
        before = self.size
        self._evict_to(target_tokens)
        return before - self.size

    # ---- internals ------------------------------------------------------------------
    def _split(self, node: _Node, n: int) -> _Node:
        """Cut `node`'s edge after n chunks: a new parent holds the first n."""
        parent = node.parent
        head = _Node(node.chunks[:n], parent, node.stamp)
        parent.children[head.chunks[0]] = head
        node.chunks = node.chunks[n:]
        node.tokens -= head.tokens
        node.parent = head
        head.children[node.chunks[0]] = node
        self._nodes += 1
        return head

    def _push(self, leaf: _Node) -> None:
        heapq.heappush(self._heap, (leaf.stamp, next(self._tiebreak), leaf))

    def _evict_to(self, target: int) -> None:
        while self.size > target and self._heap:
            stamp, _, leaf = heapq.heappop(self._heap)
            if not leaf.alive or leaf.children or leaf.stamp != stamp:
                continue  # stale entry: touched again, split, or no longer a leaf
            parent = leaf.parent
            del parent.children[leaf.chunks[0]]
            leaf.alive = False
            self._nodes -= 1
            self.size -= leaf.tokens
            self.evicted += leaf.tokens
            if not parent.children and parent is not self._root:
                self._push(parent)

    def _rebuild_heap(self) -> None:
        """Drop stale heap entries: one entry per current leaf."""
        self._heap = []
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                self._heap.append((node.stamp, next(self._tiebreak), node))
        heapq.heapify(self._heap)


def _common(edge: list[Chunk], chunks: Sequence[Chunk], start: int) -> int:
    """How many leading chunks of `edge` equal chunks[start:] (at least 1: the caller
    found the child by its first chunk)."""
    n, limit = 1, min(len(edge), len(chunks) - start)
    while n < limit and edge[n] == chunks[start + n]:
        n += 1
    return n
