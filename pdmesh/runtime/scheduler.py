"""Continuous batching with chunked prefill (plain Python, no torch).

Each step is either a prefill batch (chunks of prompts, at most `max_prefill_tokens`
tokens, at most `chunked_prefill_size` per request) or a decode batch (one token for
every decoding request). Prefill goes first, as in nano-vllm.

Pages. A request's prefill pages (its prompt, or for a retracted request everything but
its last sampled token: `Request.prefill_target`) are reserved exactly at admission and
allocated lazily chunk by chunk from that reservation (`reserved`, always backed by free
pages). Its decode pages are NOT reserved: admission only counts an estimate of them
(admission.py, SGLang's `new_token_ratio`), so requests without max_tokens (max_tokens =
the context left) don't fill the pool with pages they will never use.

Admission (FIFO, the waiting head first; `hold_for_adopt` too, and it waits while
anything waits): the request's prefill pages plus its estimated decode pages (capped at
the pool size) must fit in free pages minus reservations minus the estimated decode
pages of every running request (prefilling, decoding, held for adoption).

Retraction. Before a decode step, if the decoding requests can't all get their next page,
retract decoding requests (fewest generated tokens first, then newest) until the rest
fit: free their pages, put them back at the head of the waiting queue with their output so
far. Re-admitted, they recompute their KV as an ordinary (chunked) prefill that samples
nothing, then decode on: no token is emitted twice, and the tokens are those a run
without retraction gives (its KV is recomputed by a prefill instead of decode steps: equal
up to float rounding; greedy runs match token for token in tests/test_admission.py). An
ADOPTED request that is retracted becomes a GENERATE one (this engine has the model).
Each retraction bumps the ratio up. HELD requests are never retracted (a transfer may be
writing or reading their pages).

Progress. At a decode step nothing is prefilling (prefill goes first), so reservations are
0 and, after retracting every other decoding request, the one left (the one that has
generated the most) holds every page except those HELD for a transfer. A request never
needs more than the pool: a prompt that alone doesn't fit is refused (`can_ever_fit`), and
one whose KV would outgrow the whole pool finishes with "length" (`out_of_room`, checked
by the engine after each sampled token, like max_model_len). So each decode step samples
at least one token (or the step waits for HELD pages to be adopted or released), and
retracted requests keep their tokens: total output grows every decode step until all
finish. No starvation: a retracted request goes to the queue head, and admission is FIFO.

Prefix cache (optional, prefix_cache.py). At admission a GENERATE or PREFILL_ONLY request
takes the longest cached run of full pages that prefixes its tokens (never its last
token's page: something must be computed to give logits) and starts its prefill after
it, like a chunked prefill continuing; its reservation counts only its uncached pages,
plus the cached pages it pins that nobody referenced (they stop being evictable).
Unreferenced cached pages count as free everywhere (`available_pages`) and are evicted,
least recently used first, when an allocation finds the free list short; so every
argument above holds with "free" read as "free or evictable". A finished prefill's full
pages enter the tree at once (later requests share them while it runs); a request's full
computed pages stay cached when it finishes, is released or is retracted (not when
aborted). ADOPTED requests use the cache only with `cache_adopted` (a decode worker's
prefix cache, issue 12 item 2): `hold_for_adopt` takes the cached prefix like an
admission (pinned; only the rest is allocated and written from outside), `adopt` puts the
prompt's full pages in the tree, and finishing keeps its computed pages cached.

Fork (n > 1, fork.py). `fork(parent, children)` shares the parent's full prompt pages
with its other sequences, through the cache or a reference-counted `ForkGroup`, and
admits the children at once when they fit; a request holding group pages never uses
the cache. "Free" is unchanged: group pages are used pages until their last release.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from pdmesh.runtime.admission import NewTokenRatio, pages_for
from pdmesh.runtime.allocator import PageAllocator
from pdmesh.runtime.fork import ForkGroup
from pdmesh.runtime.prefix_cache import Node, PrefixCache
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


class Scheduler:
    def __init__(self, allocator: PageAllocator, page_size: int, max_running_requests: int,
                 max_prefill_tokens: int, chunked_prefill_size: int,
                 ratio: NewTokenRatio | None = None, cache: PrefixCache | None = None,
                 cache_adopted: bool = False) -> None:
        self.allocator, self.page_size = allocator, page_size
        self.cache, self.cache_adopted = cache, cache_adopted
        self.max_running = max_running_requests
        self.max_prefill_tokens = max_prefill_tokens
        self.chunk = chunked_prefill_size
        self.ratio = ratio or NewTokenRatio()
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.decoding: list[Request] = []
        self.held: dict[str, Request] = {}  # pages kept for a transfer (in or out)
        self.reserved = 0  # sum of req.reserved over live requests: prefill pages to come
        self.num_retracted = 0  # cumulative retractions
        self.stalled = False  # the last schedule() found decoding waiting for HELD pages

    # -- queries -------------------------------------------------------------------------
    @property
    def available_pages(self) -> int:
        """Free (or evictable cached) pages not reserved for a prefill (decode growth and
        admissions take these)."""
        return self.reclaimable_pages - self.reserved

    @property
    def reclaimable_pages(self) -> int:
        """Free pages plus cached pages no request references (evicted on demand)."""
        return self.allocator.num_free + (self.cache.num_evictable if self.cache else 0)

    @property
    def num_running(self) -> int:
        adopted = sum(1 for r in self.held.values() if r.mode is Mode.ADOPTED)
        return len(self.prefilling) + len(self.decoding) + adopted

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    def can_ever_fit(self, req: Request) -> bool:
        """Its prompt's KV fits the pool (a longer max_tokens ends early: `out_of_room`)."""
        return pages_for(req.prompt_len, self.page_size) <= self.allocator.num_pages

    def out_of_room(self, req: Request) -> bool:
        """Its next decode step would need more KV than the whole pool holds."""
        return req.num_tokens > self.allocator.num_pages * self.page_size

    def estimated_pages(self) -> int:
        """Decode pages that running requests are expected to still allocate."""
        running = self.prefilling + self.decoding + [
            r for r in self.held.values() if r.mode is Mode.ADOPTED]
        return sum(self.ratio.future_pages(r, self.page_size) for r in running)

    def _caches(self, req: Request) -> bool:
        """`req` uses the prefix cache: there is one, its KV is computed here (or it is
        ADOPTED and adopted KV is cached: `cache_adopted`) and it is no member of a fork
        group (whose pages the group owns)."""
        adopted_ok = req.mode is not Mode.ADOPTED or self.cache_adopted
        return self.cache is not None and adopted_ok and req.group is None

    def lookup(self, req: Request) -> list[Node]:
        """The cached pages `req` would start from (none without a cache, or ADOPTED)."""
        if not self._caches(req):
            return []
        target = req.prefill_target
        return self.cache.match(req.all_ids(target), (target - 1) // self.page_size)

    def fits(self, req: Request, path: list[Node] | None = None, shared: int = 0) -> bool:
        """Admission test for a request holding no pages (see the module docstring);
        `path`: the cached pages it would start from; `shared`: fork-group pages it
        would take (allocated already)."""
        if self.num_running >= self.max_running:
            return False
        path = path or []
        need = pages_for(req.prefill_target, self.page_size) - len(path) - shared
        if path:
            need += PrefixCache.count_unreferenced(path)  # pinned: no longer evictable
        need = min(need + self.ratio.future_pages(req, self.page_size), self.allocator.num_pages)
        return need <= self.available_pages - self.estimated_pages()

    # -- admission -----------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        self.waiting.append(req)

    def _admit(self, req: Request) -> bool:
        """Take `req`'s cached prefix (or fork-group) pages and reserve its other
        prefill pages."""
        group = req.group if req.group is not None and req.group.alive else None
        shared = list(group.pages) if group is not None else []
        path = [] if group is not None else self.lookup(req)
        if not self.fits(req, path, len(shared)):
            return False
        if path:
            self.cache.acquire(path)
            req.cache_nodes = list(path)
        if group is not None:
            group.acquire()
            req.group_pages = len(shared)
        if path or shared:
            req.pages = shared or [n.page for n in path]
            req.num_computed = len(req.pages) * self.page_size
        if req.cached_tokens < 0:  # counted once: a recompute after retraction doesn't
            req.cached_tokens = req.num_computed
        req.reserved = pages_for(req.prefill_target, self.page_size) - len(req.pages)
        self.reserved += req.reserved
        return True

    def hold_for_adopt(self, req: Request) -> list[int] | None:
        """Pre-allocate pages for a request whose prompt KV will be written from outside.

        Returns its page ids, or None when it does not fit yet or requests are waiting
        (retracted ones go first); the caller retries later. With `cache_adopted` the
        first `req.cached_tokens // page_size` pages are cached ones (their KV is here
        already, pinned until the request ends): only the rest are to be written.
        """
        if self.waiting or not self._admit(req):
            return None
        self._grow(req, req.prompt_len)
        req.status = Status.HELD
        self.held[req.request_id] = req
        return list(req.pages)

    def adopt(self, req: Request) -> None:
        """The held request's prompt KV is in its pages: decode it from now on.

        The caller appends the first token (sampled by the prefill) before the next step.
        """
        del self.held[req.request_id]
        req.num_computed = req.prompt_len
        if self._caches(req):  # its full prompt pages are shared from now on
            self.cache.insert(req.prompt_ids, req.pages, req.cache_nodes)
        req.status = Status.DECODING
        self.decoding.append(req)

    def fork(self, parent: Request, children: list[Request]) -> None:
        """Share `parent`'s full prompt pages (all but its last prompt token's page) with
        `children`, its other sequences (fork.py), and admit those that fit now, ahead of
        every waiting request; the rest wait at the queue's head. `parent` has its whole
        prompt's KV (just adopted, or its prefill just ended) and holds no group yet."""
        k = (parent.prompt_len - 1) // self.page_size
        if k and not self._caches(parent):  # with the cache: the tree holds them already
            parent.group = ForkGroup(parent.pages[:k], refs=1)
            parent.group_pages = k
            for c in children:
                c.group = parent.group
        for c in reversed(children):
            c.status = Status.WAITING
            self.waiting.appendleft(c)
        for c in children:
            if not self._admit(c):
                break  # FIFO: it and the ones after it wait (holding nothing)
            self.waiting.popleft()
            c.status, c.scheduled_time = Status.PREFILLING, time.monotonic()
            self.prefilling.append(c)

    # -- scheduling ----------------------------------------------------------------------
    def schedule(self) -> Batch | None:
        """Pick the next step's work: prefill chunks if any, else one decode step.

        None when there is no work, or when decoding waits for pages HELD for a transfer
        (`stalled`: stepping again is useless until an adopt, release or abort).
        """
        if self.num_running == 0:
            self.ratio.reset()  # idle: what the estimate learned no longer applies
        seqs = self._schedule_prefill()
        if seqs:
            self.stalled = False
            return Batch("prefill", seqs)
        self.stalled = bool(self.decoding) and not self._make_decode_room()
        if not self.decoding or self.stalled:
            return None
        for r in self.decoding:
            self._grow(r, r.num_computed + 1)
        self.ratio.decay()
        return Batch("decode", [ScheduledSeq(r, r.num_computed, 1, True) for r in self.decoding])

    def _schedule_prefill(self) -> list[ScheduledSeq]:
        budget, seqs = self.max_prefill_tokens, []
        for req in self.prefilling:  # unfinished chunked prompts first, in order
            if budget <= 0:
                break
            seqs.append(self._chunk(req, budget))
            budget -= seqs[-1].length
        while self.waiting and budget > 0:
            req = self.waiting[0]
            if not self._admit(req):
                break  # FIFO: the head waits for pages or a running slot
            self.waiting.popleft()
            start = req.num_computed  # after its cached prefix
            n = min(req.prefill_target - start, self.chunk, budget)
            self._grow(req, start + n)
            req.status = Status.PREFILLING
            req.scheduled_time = req.scheduled_time or time.monotonic()
            self.prefilling.append(req)
            seqs.append(self._seq(req, start, n))
            budget -= n
        return seqs

    def _chunk(self, req: Request, budget: int) -> ScheduledSeq:
        n = min(req.prefill_target - req.num_computed, self.chunk, budget)
        self._grow(req, req.num_computed + n)
        return self._seq(req, req.num_computed, n)

    @staticmethod
    def _seq(req: Request, start: int, n: int) -> ScheduledSeq:
        """A prefill chunk; it samples only when it ends a fresh prompt (not a recompute)."""
        last = start + n == req.prefill_target
        return ScheduledSeq(req, start, n, last and not req.output_ids)

    def _grow(self, req: Request, tokens: int) -> None:
        """Allocate pages so `tokens` tokens of KV fit: from the request's reservation while
        it lasts (prefill), else from unreserved free pages (decode, checked beforehand)."""
        extra = pages_for(tokens, self.page_size) - len(req.pages)
        if extra <= 0:
            return
        from_reserved = min(extra, req.reserved)
        assert extra - from_reserved <= self.available_pages, "decode outgrew the free pages"
        alloc = self.cache.alloc if self.cache is not None else self.allocator.alloc
        req.pages.extend(alloc(extra))
        req.reserved -= from_reserved
        self.reserved -= from_reserved

    # -- retraction ----------------------------------------------------------------------
    def _decode_shortfall(self) -> int:
        need = sum(1 for r in self.decoding
                   if pages_for(r.num_computed + 1, self.page_size) > len(r.pages))
        return need - self.available_pages

    def _make_decode_room(self) -> bool:
        """Retract decoding requests until the rest can each get their next page."""
        retracted = False
        while self._decode_shortfall() > 0 and len(self.decoding) > 1:
            # fewest generated tokens first; among those the newest (min keeps the first)
            self.retract(min(reversed(self.decoding), key=lambda r: len(r.output_ids)))
            retracted = True
        if retracted:
            self.ratio.bump()
        return self._decode_shortfall() <= 0  # else: pages HELD for transfers must come back

    def retract(self, req: Request) -> None:
        """Free a decoding request's KV and queue it first, to be recomputed when it fits."""
        self.decoding.remove(req)
        self._free_pages(req, keep=True)  # kept only if it uses the cache (_caches)
        req.num_computed = 0
        req.status, req.retractions = Status.WAITING, req.retractions + 1
        if req.mode is Mode.ADOPTED:
            req.mode = Mode.GENERATE  # its prompt is recomputed here from now on
        self.waiting.appendleft(req)
        self.num_retracted += 1

    def computed(self, batch: Batch) -> None:
        """Record that `batch`'s forward wrote its KV; finished prefills move to decoding."""
        for s in batch.seqs:
            if s.req.status is Status.FINISHED:  # aborted since schedule(): nothing to record
                continue
            s.req.num_computed = s.start + s.length
            if batch.kind == "prefill" and s.req.num_computed == s.req.prefill_target:
                self.prefilling.remove(s.req)
                if self._caches(s.req):
                    self.cache.insert(s.req.all_ids(s.req.num_computed), s.req.pages,
                                      s.req.cache_nodes)
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
        # an aborted request's KV may be partial (a held one's is unwritten): never cached
        self._free_pages(req, keep=reason != "abort")
        self.reserved -= req.reserved
        req.reserved = 0
        req.status, req.finish_reason = Status.FINISHED, reason

    def _free_pages(self, req: Request, keep: bool) -> None:
        """Give back `req`'s pages: with a cache and `keep`, its full computed pages enter
        the tree (unreferenced: evictable); its references (cache nodes, fork group) are
        dropped, the rest freed. Group pages are freed by the group's last release."""
        shared = req.group_pages  # a group member never holds cache nodes (_caches)
        if shared:
            self.allocator.free(req.group.release())
        if self.cache is not None:
            if keep and self._caches(req):
                self.cache.insert(req.all_ids(req.num_computed), req.pages, req.cache_nodes)
            shared = shared or len(req.cache_nodes)
            self.cache.release(req.cache_nodes)
        self.allocator.free(req.pages[shared:])
        req.pages, req.cache_nodes, req.group_pages = [], [], 0

    def flush_cache(self) -> int:
        """Evict every unreferenced cached page; returns how many."""
        return self.cache.flush() if self.cache is not None else 0
