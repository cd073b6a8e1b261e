"""A host mirror of a device KV pool, for KV transfer through host memory ("staged").

When a transfer engine cannot read or write GPU memory (a Mooncake build without CUDA,
or RDMA without GPUDirect), the pool registered for transfers is this mirror, the same
shape as the pool in pinned host memory: page p of the mirror stands for page p of the
pool. The sender copies its pages device -> mirror before the write; the receiver copies
the written pages mirror -> device when it adopts the request (Engine.adopt calls
`land`). Mirrors are found by the device pool's data pointer, so the runtime and the
transfer layer share one without knowing about each other.
"""
from __future__ import annotations

import threading
from typing import Sequence

import torch

_MIRRORS: dict[int, "KVMirror"] = {}
_LOCK = threading.Lock()


def page_runs(pages: Sequence[int]) -> list[tuple[int, int]]:
    """[(start, count)] runs of consecutive page ids, in order."""
    runs: list[tuple[int, int]] = []
    for p in pages:
        if runs and p == runs[-1][0] + runs[-1][1]:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs


class KVMirror:
    """pool [P, ...] on any device <-> host [P, ...] (pinned when the pool is on CUDA)."""

    def __init__(self, pool: torch.Tensor) -> None:
        self.pool = pool
        pin = pool.is_cuda
        self.host = torch.empty(pool.shape, dtype=pool.dtype, pin_memory=pin)
        self._stream = torch.cuda.Stream(pool.device) if pin else None

    def to_host(self, pages: Sequence[int]) -> None:
        """Copy pages pool -> mirror; returns once the bytes are in host memory.

        The caller guarantees the kernels that wrote these pages have finished (the
        engine syncs when it samples a prefill's first token)."""
        self._copy(pages, self.host, self.pool)

    def to_device(self, pages: Sequence[int]) -> None:
        """Copy pages mirror -> pool; returns once copied (later kernels see them)."""
        self._copy(pages, self.pool, self.host)

    def _copy(self, pages: Sequence[int], dst: torch.Tensor, src: torch.Tensor) -> None:
        runs = page_runs(pages)
        if self._stream is None:
            for s, n in runs:
                dst[s: s + n].copy_(src[s: s + n])
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.pool.device))
        with torch.cuda.stream(self._stream):
            for s, n in runs:
                dst[s: s + n].copy_(src[s: s + n], non_blocking=True)
        self._stream.synchronize()


def mirror_for(pool: torch.Tensor) -> KVMirror:
    """The mirror of `pool`, created (and kept) on first use."""
    with _LOCK:
        m = _MIRRORS.get(pool.data_ptr())
        if m is None or m.pool is not pool:
            m = _MIRRORS[pool.data_ptr()] = KVMirror(pool)
        return m


def has_mirror(pool: torch.Tensor) -> bool:
    with _LOCK:
        m = _MIRRORS.get(pool.data_ptr())
        return m is not None and m.pool is pool


def land(pool: torch.Tensor, pages: Sequence[int]) -> bool:
    """If `pool` has a mirror, copy `pages` mirror -> pool (their KV arrived through host
    memory) and return True; else do nothing and return False."""
    with _LOCK:
        m = _MIRRORS.get(pool.data_ptr())
    if m is None or m.pool is not pool:
        return False
    m.to_device(pages)
    return True


def drop(pool: torch.Tensor) -> None:
    """Forget `pool`'s mirror (frees its host memory once unreferenced)."""
    with _LOCK:
        m = _MIRRORS.get(pool.data_ptr())
        if m is not None and m.pool is pool:
            del _MIRRORS[pool.data_ptr()]
