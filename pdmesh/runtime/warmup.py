"""Compile the GPU prefill path's kernel specialisations at start, not while serving.

Triton compiles a kernel once per specialisation: constexprs (block sizes the host picks
from the batch's shape, masked or not) and integer arguments that are 1 or divisible by
16. Decode is covered by the CUDA-graph capture; prefill batches vary (total tokens,
sequences, cached prefix or not, rows sampled), and on a fresh machine each new shape
compiled in the middle of serving stalled the engine loop (H200 profile, 2026-11-30:
18% of a core's samples at 64 streams). Warm-up runs one forward per shape below on free
pages (their KV is garbage and is overwritten before any request reads it: a request
writes a page's KV before reading it, and the prefix cache holds computed pages only).
With Triton's disk cache a later start loads these in milliseconds.
"""
from __future__ import annotations

import time
from typing import Any

import torch

# one batch per row: (new tokens, cached prefix tokens) for each sequence; covers total
# tokens 1 / odd / multiples of 16, 1..17 sequences, with and without a prefix, short and
# long (block sizes), 1 or several sampled rows. Long prompts whose every size divides by
# 16 are a specialisation of their own (found on the H200: a 272-token prompt compiled)
SHAPES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((1, 0),), ((15, 0),), ((16, 0),), ((17, 0),), ((64, 0),), ((300, 0),), ((1100, 0),),
    ((256, 0),), ((1024, 0),), ((128, 0), (144, 0)), ((272, 16), (256, 32)),
    ((17, 0), (16, 0)), ((20, 0), (31, 0), (16, 0)), tuple((17, 0) for _ in range(16)),
    tuple((9, 0) for _ in range(17)),
    ((5, 16),), ((16, 32),), ((3, 16), (20, 16)), ((280, 16), (260, 32), (17, 48)),
)


def warm_prefill(runner: Any, shapes=SHAPES) -> float:
    """Run one prefill forward (+ LM head over its last rows) per shape on pages from
    the start of the pool; returns the seconds it took. GPU fused path only."""
    t = time.monotonic()
    P, V = runner.page_size, runner.model.cfg.vocab_size
    free = runner.kv.shape[0]
    for seqs in shapes:
        need = sum(-(-(q + c) // P) for q, c in seqs)
        if need > free:  # a tiny pool: skip what does not fit
            continue
        _forward(runner, seqs, P, V)
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return time.monotonic() - t


def _forward(runner: Any, seqs: tuple[tuple[int, int], ...], P: int, V: int) -> None:
    from pdmesh.runtime.attention import SeqSpan

    ids: list[int] = []
    pos: list[int] = []
    spans, last = [], []
    page, q_start = 0, 0
    for q, c in seqs:
        n = -(-(q + c) // P)
        spans.append(SeqSpan(q_start, q, q + c, torch.arange(page, page + n)))
        page += n
        ids.extend((7 * i + 3) % V for i in range(q))
        pos.extend(range(c, c + q))
        q_start += q
        last.append(q_start - 1)
    runner.forward_flat(ids, torch.tensor(pos), spans, last)
