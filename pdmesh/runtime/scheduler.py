"""Continuous batching with chunked prefill (plain Python, no torch).

Each step is either a prefill batch (chunks of prompts, at most `max_prefill_tokens`
tokens, at most `chunked_prefill_size` per request) or a decode batch (one token for
every decoding request). Prefill goes first, as in nano-vllm.

No-deadlock invariant: at admission a request reserves every page it could ever need
(prompt + max_tokens - 1 tokens); pages are allocated lazily from that reservation, and
admission only succeeds while free pages minus outstanding reservations cover it. So a
running request can always get its next page and nothing ever has to be preempted.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from pdmesh.runtime.allocator import PageAllocator
from pdmesh.runtime.request import Mode, Request, Status


@dataclass
class ScheduledSeq:
    """Compute tokens [start, start + length) of `req`; `sample` when that reaches its end."""

    req: Request
    start: int
    length: int
    sample: bool


@dataclass
class Batch:
    kind: str  # "prefill" | "decode"
    seqs: list[ScheduledSeq]

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.seqs)


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


class Scheduler:
    def __init__(self, allocator: PageAllocator, page_size: int, max_running_requests: int,
                 max_prefill_tokens: int, chunked_prefill_size: int) -> None:
        self.allocator, self.page_size = allocator, page_size
        self.max_running = max_running_requests
        self.max_prefill_tokens = max_prefill_tokens
        self.chunk = chunked_prefill_size
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.decoding: list[Request] = []
        self.held: dict[str, Request] = {}  # pages kept for a transfer (in or out)
        self.reserved = 0  # sum of req.reserved over live requests

    # -- queries -------------------------------------------------------------------------
    @property
    def available_pages(self) -> int:
        """Pages that a new admission may claim."""
        return self.allocator.num_free - self.reserved

    @property
    def num_running(self) -> int:
        adopted = sum(1 for r in self.held.values() if r.mode is Mode.ADOPTED)
        return len(self.prefilling) + len(self.decoding) + adopted

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    def can_ever_fit(self, req: Request) -> bool:
        return pages_for(req.kv_tokens_needed(), self.page_size) <= self.allocator.num_pages

    # -- admission -----------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        self.waiting.append(req)

    def _admit(self, req: Request, initial_tokens: int) -> bool:
        """Reserve all pages `req` may need and allocate those for `initial_tokens`."""
        need = pages_for(req.kv_tokens_needed(), self.page_size)
        if need > self.available_pages or self.num_running >= self.max_running:
            return False
        req.reserved = need
        self.reserved += need
        self._grow(req, initial_tokens)
        return True

    def hold_for_adopt(self, req: Request) -> list[int] | None:
        """Pre-allocate pages for a request whose prompt KV will be written from outside.

        Returns its page ids, or None when it does not fit yet (the caller retries later).
        """
        if not self._admit(req, req.prompt_len):
            return None
        req.status = Status.HELD
        self.held[req.request_id] = req
        return list(req.pages)

    def adopt(self, req: Request) -> None:
        """The held request's prompt KV is in its pages: decode it from now on.

        The caller appends the first token (sampled by the prefill) before the next step.
        """
        del self.held[req.request_id]
        req.num_computed = req.prompt_len
        req.status = Status.DECODING
        self.decoding.append(req)

    # -- scheduling ----------------------------------------------------------------------
    def schedule(self) -> Batch | None:
        """Pick the next step's work: prefill chunks if any, else one decode step."""
        seqs = self._schedule_prefill()
        if seqs:
            return Batch("prefill", seqs)
        if self.decoding:
            for r in self.decoding:
                self._grow(r, r.num_computed + 1)
            return Batch("decode", [ScheduledSeq(r, r.num_computed, 1, True) for r in self.decoding])
        return None

    def _schedule_prefill(self) -> list[ScheduledSeq]:
        budget, seqs = self.max_prefill_tokens, []
        for req in self.prefilling:  # unfinished chunked prompts first, in order
            if budget <= 0:
                break
            seqs.append(self._chunk(req, budget))
            budget -= seqs[-1].length
        while self.waiting and budget > 0:
            req = self.waiting[0]
            n = min(req.prompt_len, self.chunk, budget)
            if not self._admit(req, n):
                break  # FIFO: the head waits for pages or a running slot
            self.waiting.popleft()
            req.status, req.scheduled_time = Status.PREFILLING, time.monotonic()
            self.prefilling.append(req)
            seqs.append(ScheduledSeq(req, 0, n, n == req.prompt_len))
            budget -= n
        return seqs

    def _chunk(self, req: Request, budget: int) -> ScheduledSeq:
        n = min(req.prompt_len - req.num_computed, self.chunk, budget)
        end = req.num_computed + n
        self._grow(req, end)
        return ScheduledSeq(req, req.num_computed, n, end == req.prompt_len)

    def _grow(self, req: Request, tokens: int) -> None:
        """Allocate pages (from the request's reservation) so `tokens` tokens of KV fit."""
        extra = pages_for(tokens, self.page_size) - len(req.pages)
        if extra > 0:
            assert extra <= req.reserved, "request outgrew its reservation"
            req.pages.extend(self.allocator.alloc(extra))
            req.reserved -= extra
            self.reserved -= extra

    def computed(self, batch: Batch) -> None:
        """Record that `batch`'s forward wrote its KV; finished prompts move to decoding."""
        for s in batch.seqs:
            if s.req.status is Status.FINISHED:  # aborted since schedule(): nothing to record
                continue
            s.req.num_computed = s.start + s.length
            if batch.kind == "prefill" and s.sample:
                self.prefilling.remove(s.req)
                if s.req.mode is Mode.PREFILL_ONLY:
                    s.req.status = Status.HELD
                    self.held[s.req.request_id] = s.req
                else:
                    s.req.status = Status.DECODING
                    self.decoding.append(s.req)

    # -- endings -------------------------------------------------------------------------
    def finish(self, req: Request, reason: str) -> None:
        """End `req` (any state) and return all its pages and reservation."""
        if req.status is Status.FINISHED:
            return
        for queue in (self.prefilling, self.decoding):
            if req in queue:
                queue.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.held.pop(req.request_id, None)
        self.allocator.free(req.pages)
        req.pages = []
        self.reserved -= req.reserved
        req.reserved = 0
        req.status, req.finish_reason = Status.FINISHED, reason
