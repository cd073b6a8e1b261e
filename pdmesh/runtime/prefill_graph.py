"""Prefill steps under CUDA graphs: one graph per token bucket, replayed on static buffers.

Why: an eager prefill forward of the default model launches ~300 kernels (about ten per
layer), and on the H200's host their launches take ~11 ms whatever the prompt (1 x 32
tokens 10.3 ms, 16 x 280 tokens 11.7 ms; the GPU's own work is under 1 ms:
benchmarks/gpu_prefill_step.py). That fixed cost is most of a c=1 request's TTFT and a
stall of every decoding stream per prefill step; with a prefill and a decode process on
one GPU, each of those launches also waits for the other context. Replayed, it is one launch.

A batch of T new tokens in n sequences runs in the smallest bucket with T_b >= T tokens
and B_b >= n sequences (B_b = min(T_b, max_seqs)); the padding is inert:
  - token rows T..T_b: slot -1 (nothing stored), in no sequence (no attention reads or
    writes them); their garbage rows stay in their own rows through every linear/norm;
  - sequences n..B_b: q_len 0 and context 0 (the attention kernel's programs exit).
Static buffers (device, sized for the largest bucket Tmax / Bmax, page-table width W):
  ints  [3, Tmax] int64: token id, position, slot (page * page_size + offset; -1 = padding)
  seqs  [2, Bmax + 1] int32: row 0 cumulative query starts [B_b + 1], row 1 context lengths
  table [Bmax, W] int32 page ids
  last  [Bmax] int64 flat rows to sample (padding: row 0)
Graph (T_b, B_b) writes logits [B_b, V] float32 of rows last[:B_b]; `run` returns the
first len(last) of them, a view valid until the next replay (the sampler reads it first).
"""
from __future__ import annotations

import bisect
from typing import Callable, Sequence

import numpy as np
import torch

from pdmesh.runtime.attention import SeqSpan
from pdmesh.runtime.triton_backend import TritonMeta


def prefill_buckets(tokens: Sequence[int], budget: int, max_seqs: int) -> list[tuple[int, int]]:
    """(T_b, B_b) per captured size: token sizes up to the step budget (plus the smallest
    one covering it), each with min(T_b, max_seqs) sequences, ascending."""
    sizes = sorted({int(t) for t in tokens if int(t) >= 1})
    kept = [t for t in sizes if t < budget] + [t for t in sizes if t >= budget][:1]
    return [(t, min(t, max_seqs)) for t in kept]


def pick_bucket(buckets: Sequence[tuple[int, int]], tokens: int,
                n_seqs: int) -> tuple[int, int] | None:
    """The smallest (T_b, B_b) of `buckets` (ascending) with T_b >= tokens and
    B_b >= n_seqs, or None."""
    i = bisect.bisect_left(buckets, (tokens, 0))
    return next((k for k in buckets[i:] if k[1] >= n_seqs), None)


def fill_prefill_rows(ints: np.ndarray, seqs: np.ndarray, table: np.ndarray, last: np.ndarray,
                      ids: Sequence[int], pos: np.ndarray, spans: Sequence[SeqSpan],
                      last_rows: Sequence[int], page_size: int, t_pad: int, b_pad: int) -> None:
    """Fill the host buffers (module docstring) for a flat batch (ModelRunner._flatten's
    form), padded to t_pad tokens and b_pad sequences. Table entries past a sequence's
    pages, and rows past the padding, are left as they are (never read)."""
    t, n = len(ids), len(spans)
    ints[0, :t] = ids
    ints[1, :t] = pos
    for i, s in enumerate(spans):
        pages = s.table.numpy()
        table[i, : len(pages)] = pages
        p = np.arange(s.ctx_len - s.q_len, s.ctx_len)
        ints[2, s.q_start: s.q_start + s.q_len] = pages[p // page_size] * page_size + p % page_size
        seqs[0, i], seqs[1, i] = s.q_start, s.ctx_len
    ints[0:2, t:t_pad] = 0
    ints[2, t:t_pad] = -1
    seqs[0, n: b_pad + 1] = t
    seqs[1, n:b_pad] = 0
    last[: len(last_rows)] = last_rows
    last[len(last_rows): b_pad] = 0


class PrefillGraphs:
    """Captured prefill graphs of `forward(ids, positions, meta, last) -> logits [B_b, V]`."""

    def __init__(self, forward: Callable, buckets: Sequence[tuple[int, int]], max_context: int,
                 page_size: int, device: torch.device) -> None:
        self.buckets = sorted(buckets)
        self.page_size, self.device = page_size, device
        self.width = -(-max_context // page_size)
        self.max_context = self.width * page_size
        tmax, bmax = self.buckets[-1][0], max(b for _, b in self.buckets)
        self.ints = torch.zeros(3, tmax, dtype=torch.long, device=device)
        self.seqs = torch.zeros(2, bmax + 1, dtype=torch.int32, device=device)
        self.table = torch.zeros(bmax, self.width, dtype=torch.int32, device=device)
        self.last = torch.zeros(bmax, dtype=torch.long, device=device)
        self._host = [torch.zeros_like(x, device="cpu").pin_memory()
                      for x in (self.ints, self.seqs, self.table, self.last)]
        self._np = [h.numpy() for h in self._host]
        self._copied = torch.cuda.Event()
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self._capture(forward)

    def _meta(self, t: int, b: int) -> TritonMeta:
        return TritonMeta(self.ints[2, :t], self.table[:b], self.seqs[1, :b], False, [],
                          self.seqs[0, : b + 1], t)

    def _capture(self, forward: Callable) -> None:
        # every row padding (slot -1, every sequence empty): warm-up and capture write nothing
        self.ints[2].fill_(-1)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for t, b in reversed(self.buckets):  # largest first: smaller graphs reuse its pool
                meta = self._meta(t, b)
                args = (self.ints[0, :t], self.ints[1, :t], meta, self.last[:b])
                for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks algorithms
                    forward(*args)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=stream):
                    self.logits[(t, b)] = forward(*args)
                self.graphs[(t, b)] = g
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def pick(self, tokens: int, n_seqs: int, max_ctx: int) -> tuple[int, int] | None:
        """The smallest bucket holding the batch, or None (run it eagerly)."""
        return None if max_ctx > self.max_context else pick_bucket(self.buckets, tokens, n_seqs)

    def run(self, bucket: tuple[int, int], ids: Sequence[int], pos: torch.Tensor,
            spans: Sequence[SeqSpan], last: Sequence[int]) -> torch.Tensor:
        """One prefill step of a flat batch in `bucket` (from `pick`): writes its KV into
        the spans' pages; float32 logits of the rows `last` [len(last), V]."""
        self._copied.synchronize()  # the last step's copies finished reading the host buffers
        fill_prefill_rows(*self._np, ids, pos.numpy(), spans, last, self.page_size, *bucket)
        for dev, host in zip((self.ints, self.seqs, self.table, self.last), self._host):
            dev.copy_(host, non_blocking=True)
        self._copied.record()
        self.graphs[bucket].replay()
        return self.logits[bucket][: len(last)]
