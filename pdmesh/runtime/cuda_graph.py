"""Decode steps under CUDA graphs: one graph per captured batch size, replayed on static
buffers; a batch is padded up to the nearest captured size.

Static buffers (device, sized for the largest captured batch Bmax and a fixed page-table
width W = ceil(max_context / page_size)):
  ints  [4, Bmax] int64: slot (page * page_size + offset; -1 = padding row, nothing
        stored), ctx_len (0 = padding row, attention writes zeros), position, token id
  table [Bmax, W] int32 page ids
Graph b reads rows [:b] and writes logits [b, V] float32. A step fills pinned host
copies of both buffers (rows [n:b] marked as padding), copies them in asynchronously and
replays; no host sync happens here (the sampler's .tolist() is the step's one sync).
"""
from __future__ import annotations

import bisect
from typing import Callable, Sequence

import torch

from pdmesh.runtime.triton_backend import TritonMeta


def graph_batch_sizes(sizes: Sequence[int], max_batch: int) -> list[int]:
    """Sorted distinct sizes to capture, capped at max_batch (which is always included
    when a smaller size would otherwise be the largest)."""
    out = sorted({int(s) for s in sizes if 1 <= int(s) <= max_batch})
    if not out or (out[-1] < max_batch and max(int(s) for s in sizes) > max_batch):
        out.append(max_batch)
    return sorted(set(out))


def pick_batch_size(n: int, sizes: Sequence[int]) -> int | None:
    """Smallest captured size >= n (sizes sorted ascending), or None when n is larger."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


def fill_decode_rows(ints, table, token_ids: Sequence[int], pages: Sequence[Sequence[int]],
                     ctx_lens: Sequence[int], page_size: int, pad_to: int) -> None:
    """Fill numpy ints [4, >=pad_to] (slot, ctx_len, position, token) and table [>=n, W]
    for n = len(ctx_lens) decode rows; rows [n, pad_to) become padding (slot -1, ctx 0).
    Table entries past a row's used pages are left as they are (never read)."""
    for i, (pg, ctx) in enumerate(zip(pages, ctx_lens)):
        used = -(-ctx // page_size)
        table[i, :used] = pg[:used]
        pos = ctx - 1
        ints[:, i] = (pg[pos // page_size] * page_size + pos % page_size, ctx, pos, token_ids[i])
    n = len(ctx_lens)
    ints[0, n:pad_to] = -1
    ints[1:, n:pad_to] = 0


class DecodeGraphs:
    """Captured decode graphs of `forward_logits(ids, positions, meta) -> logits [b, V]`."""

    def __init__(self, forward_logits: Callable, sizes: Sequence[int], max_context: int,
                 page_size: int, vocab: int, device: torch.device,
                 num_splits: int | None = None) -> None:
        self.sizes = sorted(sizes)
        self.page_size, self.device = page_size, device
        self.width = -(-max_context // page_size)
        self.max_context = self.width * page_size
        bmax = self.sizes[-1]
        self.ints = torch.zeros(4, bmax, dtype=torch.long, device=device)
        self.table = torch.zeros(bmax, self.width, dtype=torch.int32, device=device)
        # pinned host mirrors of ints/table, filled in place each step (numpy views)
        self._host_ints = torch.zeros(4, bmax, dtype=torch.long).pin_memory()
        self._host_table = torch.zeros(bmax, self.width, dtype=torch.int32).pin_memory()
        self._host_ints_np, self._host_table_np = self._host_ints.numpy(), self._host_table.numpy()
        self._copied = torch.cuda.Event()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture(forward_logits, num_splits)

    def _meta(self, b: int, num_splits: int | None) -> TritonMeta:
        return TritonMeta(self.ints[0, :b], self.table[:b], self.ints[1, :b], True,
                          num_splits=num_splits)

    def _capture(self, forward_logits: Callable, num_splits: int | None) -> None:
        self._pad(0, self.sizes[-1])  # every row padding: warm-up and capture write nothing
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for b in reversed(self.sizes):  # largest first: smaller graphs reuse its pool
                meta = self._meta(b, num_splits)
                for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks algorithms
                    forward_logits(self.ints[3, :b], self.ints[2, :b], meta)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=stream):
                    self.logits[b] = forward_logits(self.ints[3, :b], self.ints[2, :b], meta)
                self.graphs[b] = g
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def _pad(self, n: int, b: int) -> None:
        if b > n:
            self.ints[0, n:b] = -1  # no KV store
            self.ints[1:, n:b] = 0

    def fits(self, n: int, max_ctx: int) -> bool:
        """Whether a decode batch of n sequences, the longest max_ctx tokens, fits a graph."""
        return n <= self.sizes[-1] and max_ctx <= self.max_context

    def run(self, token_ids: Sequence[int], pages: Sequence[Sequence[int]],
            ctx_lens: Sequence[int]) -> torch.Tensor:
        """One decode step: sequence i holds ctx_lens[i] tokens of KV after it (its new
        token token_ids[i] at position ctx_lens[i] - 1) in pages[i]. Returns logits [n, V],
        a view into the graph's output, valid until the next replay."""
        n = len(ctx_lens)
        b = pick_batch_size(n, self.sizes)
        self._copied.synchronize()  # the last step's copies finished reading the host buffers
        fill_decode_rows(self._host_ints_np, self._host_table_np, token_ids, pages, ctx_lens,
                         self.page_size, b)
        self.ints.copy_(self._host_ints, non_blocking=True)
        self.table.copy_(self._host_table, non_blocking=True)
        self._copied.record()
        self.graphs[b].replay()
        return self.logits[b][:n]
