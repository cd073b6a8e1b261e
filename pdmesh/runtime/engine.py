"""The engine: tokenizer + scheduler + model runner + sampler, stepped by its owner.

Not thread-safe: one thread owns an Engine and calls `step()`; servicers hand it work
through that thread. Three ways in: `generate` (offline, colocated), `PREFILL_ONLY`
requests (compute a prompt's KV, sample token 1, keep the pages for a transfer), and
`hold` + `adopt` (pages filled from outside, then decode here).

Admission counts an estimate of each request's future decode pages, not its max_tokens;
under page pressure the scheduler retracts requests and recomputes them later, invisibly
to the caller (scheduler.py). A prompt that doesn't fit the pool is refused; a request
whose KV would outgrow the whole pool finishes with "length" when it gets there.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, Sequence

import torch

from pdmesh.config import EngineConfig, engine_config_from_env
from pdmesh.runtime.allocator import PageAllocator
from pdmesh.runtime.detokenizer import IncrementalDetokenizer
from pdmesh.runtime.fork import child_id, fork_seed
from pdmesh.runtime.loader import LoadedModel, load_model
from pdmesh.runtime.model import CausalLM
from pdmesh.runtime.model_runner import KVAlloc, ModelRunner, num_pages_for, resolve_dtype
from pdmesh.runtime.prefix_cache import PrefixCache
from pdmesh.runtime.request import Mode, Request, RequestOutput, Status
from pdmesh.runtime.sampler import SamplingRow, make_generator, sample
from pdmesh.runtime.sampling_params import SamplingParams
from pdmesh.runtime.scheduler import Scheduler
from pdmesh.runtime.threads import StepThreads


class Engine:
    """Offline and worker entry point. `Engine(model="default")` serves SmolLM2-135M."""

    def __init__(self, model: str | None = None, config: EngineConfig | None = None, *,
                 loaded: LoadedModel | None = None, kv_alloc: KVAlloc | None = None,
                 **overrides: Any) -> None:
        """`model`: "default", a HF folder or a .gguf file; `overrides`: EngineConfig fields.

        `loaded` reuses an already loaded model (tests build several engines from one).
        `kv_alloc(shape, dtype)` allocates a host KV pool instead of torch.zeros (a worker
        puts it in shared memory so a prefill on the same host can write into it).
        """
        cfg = engine_config_from_env(config).replace(**overrides)
        if model is not None:
            cfg = cfg.replace(model=model)
        self.config = cfg
        if cfg.num_threads and cfg.device == "cpu":
            torch.set_num_threads(cfg.num_threads)  # loading's ops too
        self.threads = StepThreads(cfg.device, cfg.num_threads, cfg.prefill_threads,
                                   cfg.cpu_nice)
        loaded = loaded or load_model(cfg.model)
        self.model_config, self.tokenizer = loaded.config, loaded.tokenizer
        dtype = resolve_dtype(cfg.dtype, cfg.device)
        net = CausalLM(loaded.config)
        net.load_hf_weights(loaded.weights)
        net = net.to(device=cfg.device, dtype=dtype).eval()
        num_pages = num_pages_for(cfg, loaded.config, dtype)
        self.max_model_len = cfg.max_model_len or loaded.config.max_position_embeddings
        self.runner = ModelRunner(
            net, num_pages, cfg.page_size, dtype, cfg.device,
            attention_backend=cfg.attention_backend, cuda_graphs=cfg.cuda_graphs,
            graph_batch_sizes=cfg.cuda_graph_batch_sizes,
            graph_max_context=cfg.cuda_graph_max_context or self.max_model_len,
            max_batch=cfg.max_running_requests, numerics=cfg.numerics, kv_alloc=kv_alloc,
            prefill_graph_tokens=cfg.cuda_graph_prefill_tokens,
            prefill_budget=cfg.prefill_budget())
        self.allocator = PageAllocator(num_pages)
        self.cache = PrefixCache(self.allocator, cfg.page_size) if cfg.uses_prefix_cache() \
            else None
        self.scheduler = Scheduler(self.allocator, cfg.page_size, cfg.max_running_requests,
                                   cfg.prefill_budget(), cfg.chunked_prefill_size,
                                   cache=self.cache, cache_adopted=cfg.decode_prefix_cache)
        self.requests: dict[str, Request] = {}
        self.steps = {"prefill": 0, "decode": 0}  # forward steps run, by batch kind
        self._ids = itertools.count()

    # -- adding work ---------------------------------------------------------------------
    def make_request(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                     prompt_token_ids: Sequence[int] | None = None,
                     params: SamplingParams | None = None, request_id: str | None = None,
                     mode: Mode = Mode.GENERATE, detokenize: bool = True) -> Request:
        """Tokenize and validate; raises ValueError saying what is wrong. Adds nothing.

        `detokenize=False`: outputs carry no text (a mesh worker's gateway detokenizes),
        unless stop strings need it; the engine thread then skips the per-token decode."""
        params = params or SamplingParams()
        ids = self._prompt_ids(prompt, messages, prompt_token_ids)
        params.validate_for_prompt(len(ids), self.max_model_len)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        req = Request(rid, ids, params, mode=mode, stop_ids=self._stop_ids(params),
                      generator=make_generator(params.seed, self.config.device))
        if not self.scheduler.can_ever_fit(req):
            raise ValueError(f"the prompt needs {req.prompt_len} tokens of KV; the pool "
                             f"holds {self.allocator.num_pages * self.config.page_size}")
        if detokenize or params.stop:
            req.detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens,
                                               params.stop)
        return req

    def add_request(self, *args: Any, **kwargs: Any) -> str:
        """Queue a request (same arguments as `make_request`); returns its id."""
        req = self.make_request(*args, **kwargs)
        self.requests[req.request_id] = req
        self.scheduler.add(req)
        return req.request_id

    def _prompt_ids(self, prompt, messages, token_ids) -> list[int]:
        given = [x is not None for x in (prompt, messages, token_ids)]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, messages, prompt_token_ids")
        if messages is not None:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if prompt is not None:
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
            return self.tokenizer.encode(prompt)
        ids = list(token_ids)
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids out of range [0, {self.model_config.vocab_size}): "
                             f"{bad[:5]}")
        return ids

    # -- PD halves -----------------------------------------------------------------------
    def hold(self, req: Request) -> list[int] | None:
        """Pre-allocate pages for a request whose prompt KV will come from a prefill worker.

        `req` comes from `make_request(..., mode=Mode.ADOPTED)`. Returns the prompt's page
        ids, or None if the pool can't take it yet or retracted requests wait (retry
        later). With the prefix cache and `decode_prefix_cache`, the first
        `req.cached_tokens // page_size` of them hold cached KV of the prompt's prefix
        already: only the rest are to be written.
        """
        pages = self.scheduler.hold_for_adopt(req)
        if pages is not None:
            self.requests[req.request_id] = req
        return pages

    def adopt(self, request_id: str, first_token: int, first_logprob: Any = None) -> RequestOutput:
        """The held request's KV pages are filled: join the batch after `first_token`."""
        req = self.requests[request_id]
        if req.status is not Status.HELD or req.mode is not Mode.ADOPTED:
            raise ValueError(f"request {request_id!r} is not held for adoption")
        self.scheduler.adopt(req)
        self._fork(req)  # before its first token, which may finish it
        return self._append(req, first_token, first_logprob)

    def release(self, request_id: str) -> None:
        """Free a finished PREFILL_ONLY request's pages (after its KV was sent)."""
        req = self.requests.pop(request_id)
        self.scheduler.finish(req, req.finish_reason or "stop")

    def abort(self, request_id: str) -> bool:
        """End a request in any state and free its pages. False if unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req, "abort")
        return True

    def flush_cache(self) -> int:
        """Evict every cached page no request uses (the prefix cache); returns how many."""
        return self.scheduler.flush_cache()

    # -- stepping ------------------------------------------------------------------------
    @property
    def stalled(self) -> bool:
        """The last step ran nothing: decoding waits for pages held for a transfer (step
        again after an adopt, release or abort)."""
        return self.scheduler.stalled

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; returns an output for every request that moved."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        self.threads.enter(batch.kind)
        self.steps[batch.kind] += 1
        logits = self.runner.run(batch)  # [n_sampled, V]
        self.scheduler.computed(batch)
        sampled = [s.req for s in batch.seqs if s.sample]
        for r in sampled:  # a fresh prompt's prefill ended: fork before its first token
            self._fork(r)
        rows = [self._row(r) for r in sampled]
        return [self._append(r, t.token_id, t) for r, t in zip(sampled, sample(logits, rows))]

    def _fork(self, parent: Request) -> None:
        """n > 1: its other sequences, sharing its prompt's KV (fork.py). Only a parent
        whose whole prompt's KV is here now and that has no token yet (a retracted one
        recomputing samples nothing: it forked already); never a PREFILL_ONLY request
        (its KV goes to a decode worker, which forks)."""
        n = parent.params.n
        if n == 1 or parent.index or parent.output_ids or parent.mode is Mode.PREFILL_ONLY:
            return
        children = [self._child(parent, i) for i in range(1, n)]
        for c in children:
            self.requests[c.request_id] = c
        self.scheduler.fork(parent, children)

    def _child(self, parent: Request, i: int) -> Request:
        p = dataclasses.replace(parent.params, n=1, seed=fork_seed(parent.params.seed, i))
        req = Request(child_id(parent.request_id, i), parent.prompt_ids, p, mode=Mode.GENERATE,
                      stop_ids=parent.stop_ids, index=i,
                      generator=make_generator(p.seed, self.config.device))
        if parent.detok is not None:
            req.detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids,
                                               p.skip_special_tokens, p.stop)
        return req

    def _row(self, r: Request) -> SamplingRow:
        p = r.params
        banned = () if p.min_tokens == 0 else tuple(r.stop_ids)
        return SamplingRow(p, r.prompt_ids, r.output_ids, r.generator, banned)

    def _stop_ids(self, p: SamplingParams) -> frozenset[int]:
        eos = () if p.ignore_eos else self.tokenizer.eos_token_ids
        return frozenset(p.stop_token_ids) | frozenset(eos)

    def _append(self, r: Request, token: int, logprob: Any) -> RequestOutput:
        """Append a sampled token, apply stop rules, and report the request's progress."""
        r.output_ids.append(token)
        if r.first_token_time is None:
            r.first_token_time = time.monotonic()
        if r.params.logprobs is not None:
            r.logprobs.append(logprob)
        new_text, reason, by_string = "", None, False
        if token in r.stop_ids:  # the sampler masked these until min_tokens
            reason, r.stop_reason = "stop", token
        elif r.detok is not None:
            new_text, by_string = r.detok.add(token)
            if by_string:
                reason, r.stop_reason = "stop", r.detok.stop_str
        if reason is None and self._at_length(r):
            reason = "length"
        if r.mode is Mode.PREFILL_ONLY:
            r.finish_reason = reason  # pages stay held until release()
            return self._output(r, [token], new_text, finished=True, pages=list(r.pages))
        if reason is not None:
            if not by_string and r.detok is not None:  # text held back as a possible
                new_text += r.detok.flush()  # stop-string prefix is final now
            self.scheduler.finish(r, reason)
            self.requests.pop(r.request_id, None)
        return self._output(r, [token], new_text, finished=reason is not None)

    def _at_length(self, r: Request) -> bool:
        """max_tokens or the context is reached, or (decoding here) its next step would need
        more KV than the whole pool (a PREFILL_ONLY request decodes on another pool)."""
        if len(r.output_ids) >= r.params.max_tokens or r.num_tokens >= self.max_model_len:
            return True
        return r.mode is not Mode.PREFILL_ONLY and self.scheduler.out_of_room(r)

    def _output(self, r: Request, new_ids: list[int], new_text: str, finished: bool,
                pages: list[int] | None = None) -> RequestOutput:
        text = r.detok.text if r.detok is not None else ""
        return RequestOutput(r.request_id, r.prompt_ids, list(r.output_ids), text,
                             new_ids, new_text, finished, r.finish_reason, r.stop_reason,
                             list(r.logprobs) if r.params.logprobs is not None else None,
                             pages or [], max(r.cached_tokens, 0), r.index)

    # -- offline -------------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[str] | None = None,
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 messages: list[dict] | list[list[dict]] | None = None,
                 prompt_token_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
                 ) -> list[RequestOutput]:
        """Run prompts (text, chat conversations or token ids) to completion, in input order."""
        items = _batch_items(prompts, messages, prompt_token_ids)
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(items)
        if len(plist) != len(items):
            raise ValueError(f"{len(plist)} sampling params for {len(items)} prompts")
        if any(p is not None and p.n > 1 for p in plist):
            raise ValueError("generate() returns one output per prompt: for n > 1 use "
                             "add_request and step (each sequence's outputs carry its index)")
        reqs = [self.make_request(**item, params=p) for item, p in zip(items, plist)]
        for r in reqs:  # all validated before any is queued
            self.requests[r.request_id] = r
            self.scheduler.add(r)
        done: dict[str, RequestOutput] = {}
        while len(done) < len(reqs):
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[r.request_id] for r in reqs]

    def stats(self) -> dict[str, int | float]:
        """Pool and queue counters (exact: tests assert every page comes back).

        reserved_pages: free pages promised to admitted prefills (exact); estimated_pages:
        decode pages running requests are expected to still take (admission's estimate,
        not reserved); retracted: requests retracted so far (cumulative);
        new_token_ratio: admission's current estimate ratio (scheduler.py, admission.py);
        queued_prefill_tokens: prompt tokens still to compute (waiting + prefilling);
        stalled: 1 when the last step ran nothing because decoding waits for pages HELD
        for a transfer (step again after an adopt, release or abort, not in a busy loop).
        Prefix cache: free_pages counts cached pages no request uses (evicted on demand)
        as free, used_pages the others; cached_pages: pages in the tree (used or not);
        evictable_pages: those no request uses; cache_hit_pages, evicted_pages: cumulative.
        prefill_steps, decode_steps: forward steps run so far, by kind (a decode step
        interrupted by prefills more often runs fewer tokens per second).
        """
        s, c = self.scheduler, self.cache
        free = s.reclaimable_pages
        return {"num_pages": self.allocator.num_pages, "free_pages": free,
                "used_pages": self.allocator.num_pages - free, "reserved_pages": s.reserved,
                "cached_pages": c.num_pages if c else 0,
                "evictable_pages": c.num_evictable if c else 0,
                "cache_hit_pages": c.hits if c else 0, "evicted_pages": c.evicted if c else 0,
                "estimated_pages": s.estimated_pages(), "retracted": s.num_retracted,
                "new_token_ratio": s.ratio.value, "stalled": int(s.stalled),
                "waiting": len(s.waiting), "running": s.num_running, "held": len(s.held),
                "queued_prefill_tokens": sum(r.prefill_target - r.num_computed
                                             for r in (*s.waiting, *s.prefilling)),
                "prefill_steps": self.steps["prefill"], "decode_steps": self.steps["decode"]}


def _batch_items(prompts, messages, token_ids) -> list[dict]:
    if sum(x is not None for x in (prompts, messages, token_ids)) != 1:
        raise ValueError("give exactly one of prompts, messages, prompt_token_ids")
    if prompts is not None:
        return [{"prompt": p} for p in ([prompts] if isinstance(prompts, str) else prompts)]
    if messages is not None:
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return [{"messages": m} for m in convs]
    single = token_ids and isinstance(token_ids[0], int)
    return [{"prompt_token_ids": t} for t in ([token_ids] if single else token_ids)]
