"""Vectorised sampling for logits on a GPU: the whole batch in a fixed set of tensor ops
and one host sync (the chosen tokens' .tolist()), whatever mix of params the rows have.

Same pipeline and semantics as sampler.py (penalties, min_tokens masking, greedy, then
temperature, top-k, top-p on the top-k-renormalised distribution, min-p relative to the
most likely token), written as batched masks over each row's descending sort instead of
per-row branches:
  penalties    ids of prompt + output (repetition) and output (frequency/presence) go up
               as one padded [B, L] tensor; scatter builds the [B, V] seen mask and counts
  selection    sort each sampled row once; rank < top_k, cumulative mass before a token
               < top_p, logit >= max + log(min_p) are masks over the sorted row
  drawing      the exponential race argmax(p / E), E ~ Exp(1): one draw per row with no
               host round trip (torch.multinomial would sync per call)
Rows with a seed (their own generator) or asking for logprobs are not handled here
(`sample_gpu` returns None and sampler.sample takes the batch).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from pdmesh.runtime.sampling_types import SampledToken, SamplingRow


def handles(rows: Sequence[SamplingRow]) -> bool:
    """Whether sample_gpu takes this batch (no seeded rows, no logprobs)."""
    return all(r.generator is None and r.params.logprobs is None for r in rows)


def _padded(lists: list[list[int]], device: torch.device) -> torch.Tensor:
    """[B, max len] int64, padded with -1 (one pinned async copy)."""
    width = max(1, max(len(x) for x in lists))
    host = torch.full((len(lists), width), -1, dtype=torch.long)
    for i, x in enumerate(lists):
        if x:
            host[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" \
        else host.to(device)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    t = torch.tensor(values, dtype=like.dtype)
    return (t.pin_memory().to(like.device, non_blocking=True) if like.is_cuda
            else t.to(like.device))[:, None]


def apply_penalties_batched(x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition / frequency / presence penalties and min_tokens masks on x [B, V] (a
    copy is returned when anything applies)."""
    b, vocab = x.shape
    rep = [r.params.repetition_penalty for r in rows]
    freq = [r.params.frequency_penalty for r in rows]
    pres = [r.params.presence_penalty for r in rows]
    banned = [list(r.banned_until_min) if len(r.output_ids) < r.params.min_tokens else []
              for r in rows]
    if all(p == 1.0 for p in rep) and not any(freq) and not any(pres) and not any(banned):
        return x
    x = x.clone()
    if any(p != 1.0 for p in rep):
        ids = _padded([list(r.prompt_ids) + list(r.output_ids) for r in rows], x.device)
        seen = torch.zeros(b, vocab + 1, dtype=torch.bool, device=x.device)
        seen.scatter_(1, torch.where((ids >= 0) & (ids < vocab), ids, vocab), True)
        p = _column(rep, x)
        pen = torch.where(x > 0, x / p, x * p)
        x = torch.where(seen[:, :vocab], pen, x)
    if any(freq) or any(pres):
        ids = _padded([list(r.output_ids) for r in rows], x.device)
        counts = torch.zeros(b, vocab + 1, dtype=x.dtype, device=x.device)
        counts.scatter_add_(1, torch.where((ids >= 0) & (ids < vocab), ids, vocab),
                            torch.ones_like(ids, dtype=x.dtype))
        counts = counts[:, :vocab]
        x = x - _column(freq, x) * counts - _column(pres, x) * (counts > 0).to(x.dtype)
    if any(banned):
        ids = _padded(banned, x.device)
        mask = torch.zeros(b, vocab + 1, dtype=torch.bool, device=x.device)
        mask.scatter_(1, torch.where((ids >= 0) & (ids < vocab), ids, vocab), True)
        x = x.masked_fill(mask[:, :vocab], -math.inf)
    return x


def sample_gpu(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken] | None:
    """One token per row of logits [B, V] float32, or None when `handles(rows)` is False."""
    if not handles(rows):
        return None
    x = apply_penalties_batched(logits, rows)
    tokens = x.argmax(dim=-1)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        srows = [rows[i] for i in sampled]
        idx = torch.tensor(sampled, dtype=torch.long)
        idx = idx.pin_memory().to(x.device, non_blocking=True) if x.is_cuda else idx
        tokens = tokens.index_put((idx,), _draw_sorted(x[idx], srows))
    return [SampledToken(t, None, None) for t in tokens.tolist()]


def _draw_sorted(x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """x [S, V] (processed logits of sampled rows) -> token ids [S], on x's device."""
    vocab = x.shape[-1]
    x = x / _column([r.params.temperature for r in rows], x)
    vals, order = x.sort(dim=-1, descending=True)  # [S, V]
    rank = torch.arange(vocab, device=x.device)[None, :]
    k = _column([float(r.params.top_k) if 0 < r.params.top_k < vocab else float(vocab)
                 for r in rows], x)
    vals = vals.masked_fill(rank >= k, -math.inf)  # top-k
    probs = torch.softmax(vals, dim=-1)  # over the top-k survivors (or the whole row)
    p = _column([r.params.top_p if r.params.top_p < 1.0 else math.inf for r in rows], x)
    vals = vals.masked_fill(probs.cumsum(dim=-1) - probs >= p, -math.inf)  # top-p prefix
    min_p = _column([r.params.min_p for r in rows], x)
    vals = vals.masked_fill(vals < vals[:, :1] + torch.log(min_p), -math.inf)  # min-p
    probs = torch.softmax(vals, dim=-1)
    race = probs / torch.empty_like(probs).exponential_().clamp_min_(1e-30)  # ~ Categorical
    return order.gather(1, race.argmax(dim=-1, keepdim=True))[:, 0]
