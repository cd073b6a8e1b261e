"""Turning page-id lists into few, large transfer descriptors (pure functions)."""
from __future__ import annotations

from typing import Sequence

Run = tuple[int, int, int]  # (src_start, dst_start, n_pages)


def validate_pages(src_pages: Sequence[int], dst_pages: Sequence[int]) -> None:
    """Refuse page lists that cannot describe a transfer: unequal lengths, negative ids,
    or a destination page written twice (that would race two source pages onto one)."""
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"src_pages has {len(src_pages)} ids but dst_pages has {len(dst_pages)}")
    for name, pages in (("src_pages", src_pages), ("dst_pages", dst_pages)):
        bad = [p for p in pages if not isinstance(p, int) or p < 0]
        if bad:
            raise ValueError(f"{name} holds invalid page ids {bad[:8]} (must be ints >= 0)")
    if len(set(dst_pages)) != len(dst_pages):
        raise ValueError("dst_pages names a page more than once")


def plan_runs(src_pages: Sequence[int], dst_pages: Sequence[int]) -> list[Run]:
    """Merge the pairs (src_pages[i], dst_pages[i]) into runs consecutive on both sides.

    A run (s, d, n) stands for the pairs (s+k, d+k), k < n; the runs cover the pairs in
    order. A new run starts exactly where either side stops being consecutive, so no two
    adjacent runs could be merged: the number of runs (= descriptors) is minimal.
    """
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"src_pages has {len(src_pages)} ids but dst_pages has {len(dst_pages)}")
    runs: list[Run] = []
    for s, d in zip(src_pages, dst_pages):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


def runs_to_descriptors(runs: Sequence[Run], src_base: int, dst_base: int,
                        bytes_per_page: int) -> tuple[list[int], list[int], list[int]]:
    """(src addresses, dst addresses, lengths) of the runs, one descriptor per run."""
    src = [src_base + s * bytes_per_page for s, _, _ in runs]
    dst = [dst_base + d * bytes_per_page for _, d, _ in runs]
    lengths = [n * bytes_per_page for _, _, n in runs]
    return src, dst, lengths


def page_runs(pages: Sequence[int]) -> list[tuple[int, int]]:
    """[(start, count)] runs of consecutive page ids, in order."""
    runs: list[tuple[int, int]] = []
    for p in pages:
        if runs and p == runs[-1][0] + runs[-1][1]:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs
