"""Rank 0 schedules, the other ranks follow: one `Step` per forward, broadcast from rank 0.

KV: each rank has its own paged pool (the runtime's layout, kv[P, L, page, 2, hkv, Dh],
with only that rank's KV heads), and every rank uses the same page ids, which rank 0
picks (a PageAllocator, pages for prompt + max_tokens reserved up front) and sends in
the step. A step on the wire: a header [n_seqs, payload_len] (n_seqs = 0: stop), then
the int64 payload [q_len * n, ctx_len * n, n_pages * n, sample * n, ids * T,
positions * T, pages].
Two leads for rank 0: `greedy_generate` (this module: prefill of every prompt in one
forward, then one token per sequence per forward), and an Engine whose runner is the
TPRunner (`TPRunner.run` takes the scheduler's Batch, as ModelRunner.run does; see
lead.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from pdmesh.runtime.allocator import PageAllocator
from pdmesh.runtime.attention import SeqSpan, get_attention_backend, resolve_attention_backend
from pdmesh.runtime.scheduler import Batch
from pdmesh.runtime.tp.model import TPCausalLM


@dataclass
class Step:
    """One forward over a flat batch: sequence i has q_lens[i] new tokens, ctx_lens[i]
    tokens of KV after the forward, in pages[i], and its last token's logits are wanted
    when sample[i]; ids/positions: [T] flat."""

    ids: list[int]
    positions: list[int]
    q_lens: list[int]
    ctx_lens: list[int]
    pages: list[list[int]]
    sample: list[bool]

    def encode(self) -> torch.Tensor:
        flat = [*self.q_lens, *self.ctx_lens, *map(len, self.pages), *map(int, self.sample),
                *self.ids, *self.positions, *(p for ps in self.pages for p in ps)]
        return torch.tensor(flat, dtype=torch.long)

    @classmethod
    def decode(cls, n: int, payload: torch.Tensor) -> "Step":
        v = payload.tolist()
        q_lens, ctx_lens, n_pages = v[:n], v[n:2 * n], v[2 * n:3 * n]
        sample, v = [bool(x) for x in v[3 * n:4 * n]], v[4 * n:]
        t = sum(q_lens)
        ids, pos, rest = v[:t], v[t:2 * t], v[2 * t:]
        pages, at = [], 0
        for k in n_pages:
            pages.append(rest[at:at + k])
            at += k
        return cls(ids, pos, q_lens, ctx_lens, pages, sample)


def step_from_batch(batch: Batch, page_size: int) -> Step:
    """The scheduler's batch as a Step (ModelRunner._flatten's order: each scheduled
    sequence's tokens [start, start + length), with the pages its KV then occupies)."""
    ids, pos, q_lens, ctx_lens, pages, sample = [], [], [], [], [], []
    for s in batch.seqs:
        end = s.start + s.length
        ids += s.req.tokens(s.start, end)
        pos += range(s.start, end)
        q_lens.append(s.length)
        ctx_lens.append(end)
        pages.append(list(s.req.pages[: -(-end // page_size)]))
        sample.append(s.sample)
    return Step(ids, pos, q_lens, ctx_lens, pages, sample)


class TPRunner:
    """One rank's model and KV pool. Rank 0 calls `run(batch)` (or `send` then `forward`)
    for each step; the other ranks `follow`, forwarding the same steps in the same order."""

    def __init__(self, model: TPCausalLM, num_pages: int, page_size: int,
                 kv_alloc: Callable[[tuple, torch.dtype], torch.Tensor] | None = None,
                 attention: str = "auto") -> None:
        """`kv_alloc(shape, dtype)`: a zeroed host pool instead of torch.zeros (a worker's
        ranks put theirs in shared memory, so rank 0 can move every rank's KV).
        `attention`: the backend on CUDA ("auto": Triton); CPU ranks keep the torch
        backend (the exactness tests' oracle)."""
        self.model, self.page_size, self.group = model, page_size, model.group
        w, shape = model.embed_tokens.weight, model.kv_shape(num_pages, page_size)
        if kv_alloc is not None and w.device.type == "cpu":
            self.kv = kv_alloc(shape, w.dtype)
        else:
            self.kv = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.backend = "torch" if w.device.type == "cpu" else \
            resolve_attention_backend(attention, w.device)
        self.attn_cls = get_attention_backend(self.backend)
        if self.backend != "torch":
            model.set_attention_backend(self.attn_cls)
        self.graphs = None  # DecodeGraphs once capture_graphs ran (CUDA)

    def capture_graphs(self, sizes: Sequence[int], max_context: int) -> None:
        """Capture decode steps of `sizes` sequences (CUDA, Triton backend) with the
        collectives inside; every rank calls this at the same point (the warm-up and
        capture run collectives). Afterwards a decode Step that fits replays a graph."""
        from pdmesh.runtime.cuda_graph import DecodeGraphs

        if self.backend != "triton":
            raise ValueError(f"CUDA graphs need the triton backend, not {self.backend}")
        max_context = min(max_context, self.kv.shape[0] * self.page_size)
        self.graphs = DecodeGraphs(self._forward_logits, sizes, max_context, self.page_size,
                                   self.model.cfg.vocab_size, self.group.device)

    def _forward_logits(self, ids: torch.Tensor, pos: torch.Tensor, meta) -> torch.Tensor:
        return self.model.logits(self.model(ids, pos, self.kv, meta))

    def run(self, batch: Batch) -> torch.Tensor:
        """Rank 0, ModelRunner.run's contract (so an Engine can step on it): forward the
        scheduler's `batch` on every rank -> float32 logits [n_sampled, V]."""
        step = step_from_batch(batch, self.page_size)
        self.send(step)
        return self.forward(step)

    def forward(self, step: Step) -> torch.Tensor:
        """Forward `step` (writing this rank's KV) -> float32 logits [n_sampled, V] of the
        sampled sequences' last tokens, the same on every rank. A decode step that fits
        a captured graph replays it (every rank decides alike: the same step)."""
        if self._graphed(step):
            return self.graphs.run(step.ids, step.pages, step.ctx_lens)
        dev, spans, q0 = self.group.device, [], 0
        for q_len, ctx, pages in zip(step.q_lens, step.ctx_lens, step.pages):
            spans.append(SeqSpan(q0, q_len, ctx, torch.tensor(pages, dtype=torch.long)))
            q0 += q_len
        meta = self.attn_cls.build_metadata(spans, self.page_size, dev)
        hidden = self.model(torch.tensor(step.ids, device=dev),
                            torch.tensor(step.positions, device=dev), self.kv, meta)
        last = [s.q_start + s.q_len - 1 for s, keep in zip(spans, step.sample) if keep]
        if not last:  # every rank knows: no logits collective this step
            return hidden.new_empty(0, self.model.cfg.vocab_size, dtype=torch.float32)
        return self.model.logits(hidden[torch.tensor(last, device=dev)])

    def _graphed(self, step: Step) -> bool:
        return (self.graphs is not None and bool(step.q_lens)
                and all(q == 1 for q in step.q_lens) and all(step.sample)
                and self.graphs.fits(len(step.q_lens), max(step.ctx_lens)))

    def send(self, step: Step | None) -> None:
        """Rank 0: announce `step` (None: stop) to the followers."""
        if self.group.size == 1:  # no followers
            return
        payload = step.encode() if step is not None else torch.zeros(0, dtype=torch.long)
        n = len(step.q_lens) if step is not None else 0
        self.group.broadcast(torch.tensor([n, payload.numel()], device=self.group.device))
        if n:
            self.group.broadcast(payload.to(self.group.device))

    def receive(self) -> Step | None:
        """Other ranks: the next step rank 0 sends, or None at stop."""
        dev = self.group.device
        n, size = self.group.broadcast(torch.zeros(2, dtype=torch.long, device=dev)).tolist()
        if n == 0:
            return None
        payload = self.group.broadcast(torch.empty(size, dtype=torch.long, device=dev))
        return Step.decode(n, payload.cpu())

    def follow(self) -> int:
        """Other ranks: run rank 0's steps until it says stop; returns the step count."""
        steps = 0
        while (step := self.receive()) is not None:
            self.forward(step)
            steps += 1
        return steps


def pages_needed(prompts: list[list[int]], max_tokens: int, page_size: int) -> int:
    """Pages for every prompt plus max_tokens, reserved up front."""
    return sum(-(-(len(p) + max_tokens) // page_size) for p in prompts)


def greedy_generate(runner: TPRunner, prompts: list[list[int]], max_tokens: int,
                    stop_token_ids: tuple[int, ...] = ()) -> list[list[int]]:
    """Rank 0: greedy tokens for each prompt (at most max_tokens; a stop id ends a
    sequence and is kept), followers following; sends them stop when done."""
    if any(not p for p in prompts) or max_tokens < 1:
        raise ValueError("every prompt needs a token and max_tokens must be >= 1")
    size, alloc = runner.page_size, PageAllocator(runner.kv.shape[0])
    tokens = [list(p) for p in prompts]
    pages = [alloc.alloc(pages_needed([p], max_tokens, size)) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    step = _next_step(tokens, pages, active, size, prefill=True)
    while active:
        runner.send(step)
        best = runner.forward(step).argmax(dim=-1).tolist()
        for i, tok in zip(active, best):
            out[i].append(tok)
            tokens[i].append(tok)
        active = [i for i in active
                  if len(out[i]) < max_tokens and out[i][-1] not in stop_token_ids]
        step = _next_step(tokens, pages, active, size)
    # not on an exception: the followers may be inside a collective of the failed step,
    # where a stop broadcast would pair with the wrong op (the launcher stops them)
    runner.send(None)
    return out


def _next_step(tokens: list[list[int]], pages: list[list[int]], active: list[int],
               page_size: int, prefill: bool = False) -> Step:
    """The forward of sequences `active`: all their tokens (prefill) or each one's last;
    each with the pages its KV occupies after the forward."""
    ids, pos, q_lens, ctx_lens, tables = [], [], [], [], []
    for i in active:
        n = len(tokens[i])
        q = n if prefill else 1
        ids += tokens[i][n - q:]
        pos += range(n - q, n)
        q_lens.append(q)
        ctx_lens.append(n)
        tables.append(pages[i][: -(-n // page_size)])
    return Step(ids, pos, q_lens, ctx_lens, tables, [True] * len(active))


__all__ = ["Step", "TPRunner", "greedy_generate", "pages_needed", "step_from_batch"]
