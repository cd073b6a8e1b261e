"""Free-list KV page allocator: plain Python, no torch, exact accounting.

Invariant: every page id in [0, num_pages) is in exactly one of: the free list,
the used set. `check()` asserts it; tests call it after every operation.
"""
from __future__ import annotations


class OutOfPages(RuntimeError):
    """Raised when an allocation asks for more pages than are free."""


class PageAllocator:
    """Hands out page ids; freed pages are reused most-recently-freed first (warm memory)."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() yields 0, 1, 2, ...
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def alloc(self, n: int) -> list[int]:
        """Take `n` pages; raises OutOfPages (and takes none) if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        """Return pages; a page that is not in use (double free, bad id) raises and frees nothing."""
        bad = [p for p in pages if p not in self._used]
        if bad or len(set(pages)) != len(pages):
            raise ValueError(f"freeing pages not in use: {bad or 'duplicates'}")
        self._used.difference_update(pages)
        self._free.extend(reversed(pages))

    def check(self) -> None:
        """Assert the accounting invariant (for tests and debugging)."""
        free = set(self._free)
        assert len(free) == len(self._free), "duplicate page in free list"
        assert not (free & self._used), "page both free and used"
        assert free | self._used == set(range(self.num_pages)), "page lost"
