"""A host mirror of a device KV pool, for KV transfer through host memory ("staged").

When a transfer engine cannot read or write GPU memory (a Mooncake build without CUDA,
or RDMA without GPUDirect), the pool registered for transfers is this mirror, the same
shape as the pool in pinned host memory: page p of the mirror stands for page p of the
pool. The sender copies its pages device -> mirror before the write; the receiver copies
the written pages mirror -> device before it adopts the request. The mirror belongs to
the transport that registered it (pdmesh.transfer.staged.StagedTransport); the runtime
never sees it.
"""
from __future__ import annotations

from typing import Sequence

import torch

from pdmesh.transfer.plan import page_runs


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
