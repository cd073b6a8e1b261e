"""Token sampling for one decode step over a batch of requests.

Pipeline per row (B rows, V vocab entries):
  1. penalties: repetition (prompt + output), frequency and presence (output only);
  2. min_tokens: eos/stop ids masked to -inf while the output is shorter than min_tokens;
  3. logprobs: log_softmax of the logits *at this point* -- after penalties and masking,
     before temperature/top-k/top-p/min-p. This matches vLLM's "processed logprobs"
     closely enough (vLLM's also reflect temperature and truncation), and equals the raw
     model logprobs when no penalty or min_tokens mask applies;
  4. greedy rows: argmax;
  5. sampled rows: temperature, top-k, then top-p (on the top-k-renormalised
     distribution), then min-p (relative to the most likely token), then
     `torch.multinomial` with the row's own generator, so a seeded request draws the
     same tokens whatever else shares its batch.

`sample` never writes to the caller's logits: rows are copied before being modified.
All-greedy batches without penalties/logprobs take one batched argmax and nothing else.
A seeded row's generator must live on the logits' device (`make_generator(seed, device)`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from pdmesh.runtime.sampling_params import SamplingParams
# (the engine, pdmesh.worker.convert and tests import these two from here too)
from pdmesh.runtime.sampling_types import SampledToken, SamplingRow

# Candidates taken with `topk` for a top-p row without top-k; if their mass is short of
# top_p the row is redone over the whole vocabulary (exact either way).
TOP_P_CANDIDATES = 1024


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with `seed` (on the logits' device), or None for the global RNG."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def has_penalties(params: SamplingParams) -> bool:
    return (params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0)


def _masks_min_tokens(row: SamplingRow) -> bool:
    return bool(row.banned_until_min) and len(row.output_ids) < row.params.min_tokens


def _needs_processing(row: SamplingRow) -> bool:
    """Whether the row's logits must be modified (penalties or min_tokens masking)."""
    return has_penalties(row.params) or _masks_min_tokens(row)


def apply_penalties(logits: torch.Tensor, prompt_ids: Sequence[int], output_ids: Sequence[int],
                    params: SamplingParams) -> torch.Tensor:
    """Apply repetition/frequency/presence penalties to one row IN PLACE and return it.

    logits: [V]. Repetition (HF/vLLM): for each distinct id in prompt + output, a positive
    logit is divided by the penalty and a negative one multiplied. Frequency/presence
    (OpenAI), over output ids only: logit -= frequency * count + presence * (count > 0).
    """
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(list(prompt_ids) + list(output_ids), dtype=torch.long, device=logits.device)
        seen = seen[seen < vocab].unique()  # ids past the lm_head (tokenizer extras) can't be penalised
        vals = logits[seen]
        p = params.repetition_penalty
        logits[seen] = torch.where(vals > 0, vals / p, vals * p)
    if (params.frequency_penalty != 0.0 or params.presence_penalty != 0.0) and len(output_ids):
        out = torch.tensor(list(output_ids), dtype=torch.long, device=logits.device)
        ids, counts = out[out < vocab].unique(return_counts=True)  # touches only seen ids, not [V]
        logits[ids] -= params.frequency_penalty * counts.to(logits.dtype) + params.presence_penalty
    return logits


def _process(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Penalties + min_tokens masking. Returns logits itself, or a modified copy."""
    out = logits
    for i, row in enumerate(rows):
        if not _needs_processing(row):
            continue
        if out is logits:
            out = logits.clone()  # copy once, on the first row that needs changes
        if has_penalties(row.params):
            apply_penalties(out[i], row.prompt_ids, row.output_ids, row.params)
        if _masks_min_tokens(row):
            banned = [t for t in row.banned_until_min if 0 <= t < logits.shape[-1]]
            out[i, banned] = -math.inf
    return out


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken]:
    """Pick one token per row. logits: [B, V] float32, B == len(rows); not modified."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [B={len(rows)}, V], got {tuple(logits.shape)}")
    if logits.dtype != torch.float32:
        logits = logits.float()
    # Fast path (the common case): all greedy, nothing to modify, no logprobs.
    if all(r.params.greedy and r.params.logprobs is None and not _needs_processing(r) for r in rows):
        return [SampledToken(t, None, None) for t in logits.argmax(dim=-1).tolist()]
    if logits.is_cuda:  # batched masks + one sync (seeded / logprobs rows: the path below)
        from pdmesh.runtime.gpu_sampler import sample_gpu

        out = sample_gpu(logits, rows)
        if out is not None:
            return out

    x = _process(logits, rows)  # [B, V]
    token_ids = [0] * len(rows)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if greedy:
        chosen = (x if len(greedy) == len(rows) else x[greedy]).argmax(dim=-1).tolist()
        for i, t in zip(greedy, chosen):
            token_ids[i] = t
    if sampled:
        chosen = _sample_rows(x[sampled], [rows[i] for i in sampled])
        for i, t in zip(sampled, chosen):
            token_ids[i] = t
    return _with_logprobs(x, rows, token_ids)


def _with_logprobs(x: torch.Tensor, rows: Sequence[SamplingRow],
                   token_ids: list[int]) -> list[SampledToken]:
    """Attach logprobs (from log_softmax of the processed logits x: [B, V]) where asked."""
    results = [SampledToken(t, None, None) for t in token_ids]
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not want:
        return results
    xs = x if len(want) == len(rows) else x[want]  # [W, V]
    lse = xs.logsumexp(dim=-1, keepdim=True)  # log_softmax(x) = x - lse, without a [W, V] result
    chosen_ids = torch.tensor([token_ids[i] for i in want], dtype=torch.long, device=x.device)
    chosen = (xs.gather(1, chosen_ids[:, None]) - lse)[:, 0].tolist()
    n_max = max(rows[i].params.logprobs for i in want)
    top_vals, top_ids = xs.topk(n_max, dim=-1) if n_max else (xs[:, :0], xs[:, :0].long())
    top_vals, top_ids = (top_vals - lse).tolist(), top_ids.tolist()
    for j, i in enumerate(want):
        n = rows[i].params.logprobs
        results[i].logprob = chosen[j]
        results[i].top_logprobs = list(zip(top_ids[j][:n], top_vals[j][:n]))
    return results


def _draw(probs: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int]:
    """One index per row of probs: [S, N]. Unseeded rows share one call on the global RNG;
    seeded rows draw from their own generator, so their result ignores the rest of the batch."""
    out = [0] * len(rows)
    unseeded = [j for j, r in enumerate(rows) if r.generator is None]
    if unseeded:
        for j, t in zip(unseeded, torch.multinomial(probs[unseeded], 1)[:, 0].tolist()):
            out[j] = t
    for j, r in enumerate(rows):
        if r.generator is not None:
            out[j] = int(torch.multinomial(probs[j], 1, generator=r.generator))
    return out


def _rows(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """x[idx] (a copy), or x itself when idx is every row in order."""
    return x if idx == list(range(x.shape[0])) else x[idx]


def _sample_rows(x: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int]:
    """Sample one token per row. x: [S, V], a private copy (modified in place).

    Rows with top-k/top-p work on a sorted candidate set from `topk` instead of sorting
    the whole vocabulary. A row's candidate count depends only on its own params and
    logits, so a seeded row sees identical tensors whatever shares its batch.
    """
    vocab = x.shape[-1]
    temps = torch.tensor([r.params.temperature for r in rows], dtype=x.dtype, device=x.device)
    x.div_(temps[:, None])
    out = [0] * len(rows)
    groups: dict[int, list[int]] = {}  # candidate count -> row indices
    full = []
    for j, r in enumerate(rows):
        k = r.params.top_k
        if k > 0:
            groups.setdefault(min(k, vocab), []).append(j)
        elif r.params.top_p < 1.0:
            groups.setdefault(min(TOP_P_CANDIDATES, vocab), []).append(j)
        else:
            full.append(j)
    if full:
        for j, t in zip(full, _sample_full(_rows(x, full), [rows[j] for j in full])):
            out[j] = t
    while groups:
        cand, idx = groups.popitem()
        got = _sample_candidates(_rows(x, idx), [rows[j] for j in idx], cand)
        for j, t in zip(idx, got):
            if t is None:  # nucleus wider than the candidates: redo over the whole vocab
                groups.setdefault(vocab, []).append(j)
            else:
                out[j] = t
    return out


def _sample_full(x: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int]:
    """Rows without top-k/top-p. x: [S, V] (temperature applied); min-p in place."""
    if any(r.params.min_p > 0.0 for r in rows):
        _min_p(x, rows)
    return _draw(torch.softmax(x, dim=-1), rows)


def _sample_candidates(x: torch.Tensor, rows: Sequence[SamplingRow], cand: int) -> list[int | None]:
    """Top-k, then top-p on the top-k-renormalised distribution, then min-p, then draw.

    x: [S, V] (temperature applied); each row has top_k == cand, or top-k off. Works on
    the `cand` best tokens per row, sorted descending; every filter keeps a prefix.
    Returns None (and draws nothing) for a row whose top-p nucleus does not fit in the
    candidates, which is only possible without top-k.
    """
    vocab = x.shape[-1]
    vals, order = x.topk(cand, dim=-1)  # [S, C] descending; for top-k rows this *is* top-k
    # probabilities over the top-k survivors, or over the whole row when top-k is off
    has_k = [0 < r.params.top_k < vocab for r in rows]
    norm = vals.logsumexp(dim=-1)  # [S]
    no_k = [j for j, h in enumerate(has_k) if not h]
    if no_k:
        norm[no_k] = x[no_k].logsumexp(dim=-1)
    probs = (vals - norm[:, None]).exp()
    # top_p == 1 means off; inf avoids trimming the tail when the cumsum rounds past 1.0
    p = torch.tensor([r.params.top_p if r.params.top_p < 1.0 else math.inf for r in rows],
                     dtype=x.dtype, device=x.device)
    cum = probs.cumsum(dim=-1)
    # keep the smallest prefix whose mass reaches p: drop a token once the mass before it >= p
    vals.masked_fill_(cum - probs >= p[:, None], -math.inf)
    short = (cum[:, -1] < p).tolist() if cand < vocab else [False] * len(rows)
    ok = [j for j in range(len(rows)) if has_k[j] or not short[j]]
    result: list[int | None] = [None] * len(rows)
    if not ok:
        return result
    vals, order, ok_rows = _rows(vals, ok), _rows(order, ok), [rows[j] for j in ok]
    if any(r.params.min_p > 0.0 for r in ok_rows):
        _min_p(vals, ok_rows)
    picks = torch.tensor(_draw(torch.softmax(vals, dim=-1), ok_rows), device=x.device)
    for j, t in zip(ok, order.gather(1, picks[:, None])[:, 0].tolist()):
        result[j] = t
    return result


def _min_p(x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """In place: drop tokens with prob < min_p * max prob, i.e. logit < max + log(min_p)."""
    min_p = torch.tensor([r.params.min_p for r in rows], dtype=x.dtype, device=x.device)
    threshold = x.max(dim=-1).values + torch.log(min_p)  # log(0) = -inf keeps everything
    x.masked_fill_(x < threshold[:, None], -math.inf)
