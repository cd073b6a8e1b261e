"""Discrete-event simulator of a PxDy deployment (no real model, no real time).

    sim = Simulator(profile, Deployment.parse("2P1D"), Workload(3000, 4000, 400, 600))
    results = sim.run(FixedLoad(parallel=16, number=64))     # or RateLoad(rate=2.0, number=64)

What it models, per request: clients (fixed concurrency, evalscope's --parallel/--number,
all clients start at t=0 and send their next request when the last one ends; or Poisson
arrivals) -> round-robin router (a prefill and a decode worker, as the gateway's default)
-> the prefill worker's FIFO queue and batched chunked prefill (steps of at most
max_prefill_tokens, chunked_prefill_size per prompt) and, concurrently, the decode
worker's admission (slots and KV reserved for input + output tokens, FIFO) -> the KV
transfer once both are done -> the decode worker's continuous batching, which the request
joins at the next step boundary and leaves after output - 1 steps.

Multi-turn (workload MultiTurn, FixedLoad only): P clients each run a conversation turn
by turn (the next turn `think_time` after the reply ends; turn k's prompt is the system
prompt + the history + user message k), then start the next conversation. Requests are
numbered in send order, so round robin scatters a conversation's turns over the prefills.

Prefix cache (profile.prefix_cache): each prefill worker remembers the prompts it has
prefilled, as "system prompt seen" and, per conversation, the longest prompt of it seen
(a conversation's earlier prompt is a prefix of its later ones; replies are not, since
the decode generated them). When the worker first schedules a prompt, its cached prefix
is the longer of the two, in whole pages (page_size), leaving at least one token to
compute; only the rest costs prefill time. Prompts the worker is still computing are not
hits (as in the engine: pages are shared once written). Not modelled: eviction (the
cache is unbounded), attention over the cached context, prefixes shared across
conversations beyond the system prompt.

Cost: O(steps + requests·log) — a decode step is one event whatever its batch size
(per-request token times are read back from the worker's step end times).
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque

import numpy as np

from pdmesh.sim.profile import Profile
from pdmesh.sim.workload import (Deployment, FixedLoad, MultiTurn, RateLoad, SimRequest,
                                 Workload)

__all__ = ["Deployment", "FixedLoad", "MultiTurn", "RateLoad", "SimRequest", "Simulator",
           "Workload"]


class _Prefill:
    def __init__(self, sim: "Simulator") -> None:
        # queue: [req, tokens left, scheduled yet]
        self.sim, self.queue, self.busy = sim, deque(), False
        self.system_seen = False  # prefix cache: the shared system prompt
        self.seen: dict[int, int] = {}  # conversation -> longest prompt of it prefilled here

    def arrive(self, req: SimRequest, now: float) -> None:
        self.queue.append([req, req.input_len, False])
        self.sim.soon(self, now)

    def cached_prefix(self, req: SimRequest) -> int:
        """Prompt tokens of `req` found in this worker's prefix cache (whole pages)."""
        p, mt = self.sim.profile, self.sim.multi_turn
        if not p.prefix_cache or mt is None or req.conversation < 0:
            return 0
        hit = max(self.seen.get(req.conversation, 0), mt.system_len if self.system_seen else 0)
        hit = min(hit, req.input_len - 1)  # the engine computes at least the last token
        return hit // p.page_size * p.page_size

    def remember(self, req: SimRequest) -> None:
        if req.conversation >= 0:
            self.system_seen = True
            self.seen[req.conversation] = max(self.seen.get(req.conversation, 0), req.input_len)

    def kick(self, now: float) -> None:
        if self.busy or not self.queue:
            return
        p, budget, batch = self.sim.profile, self.sim.profile.max_prefill_tokens, []
        for item in self.queue:  # FIFO; a chunked prompt in progress is at the front
            if budget <= 0:
                break
            if not item[2]:  # first scheduled: look its prefix up in the cache
                item[2] = True
                item[0].cached = self.cached_prefix(item[0])
                item[1] = item[0].input_len - item[0].cached
            n = min(item[1], p.chunked_prefill_size, budget)
            batch.append((item, n))
            budget -= n
        tokens = sum(n for _, n in batch)
        self.busy = True
        self.sim.work(now, self, p.prefill_time(tokens), self.step_done, batch)

    def step_done(self, now: float, batch: list) -> None:
        self.busy = False
        for item, n in batch:
            item[1] -= n
            if item[1] == 0:  # a short prompt may finish behind a long one still chunking
                self.queue.remove(item)
                self.remember(item[0])
                item[0].t_prefill_done = now
                self.sim.maybe_transfer(item[0], now)
        self.kick(now)


class _Decode:
    def __init__(self, sim: "Simulator") -> None:
        self.sim, self.busy = sim, False
        self.admit_q: deque[SimRequest] = deque()  # pre-allocation queue (FIFO)
        self.held = 0  # admitted, not yet running (waiting for / receiving KV)
        self.kv_used = 0
        self.ready: list[SimRequest] = []
        self.running: list[tuple[int, int, SimRequest]] = []  # heap: (finish step, index, req)
        self.context = 0  # KV tokens of the running requests, all together
        self.steps, self.step_ends = 0, []

    def arrive(self, req: SimRequest, now: float) -> None:
        self.admit_q.append(req)
        self.try_admit(now)

    def try_admit(self, now: float) -> None:
        p = self.sim.profile
        while self.admit_q:
            req = self.admit_q[0]
            need = req.input_len + req.output_len
            if (self.held + len(self.running) >= p.max_running_requests
                    or self.kv_used + need > p.kv_capacity_tokens):
                return
            self.admit_q.popleft()
            self.kv_used += need
            self.held += 1
            req.t_admit = now
            self.sim.maybe_transfer(req, now)

    def on_ready(self, now: float, req: SimRequest) -> None:
        req.t_ready = now
        self.ready.append(req)
        self.sim.soon(self, now)

    def kick(self, now: float) -> None:
        if self.busy:
            return
        after_step = self.sim.profile.first_token_after_step
        for req in self.ready:  # join at this step boundary
            self.held -= 1
            req.t_join = now
            if req.output_len == 1:
                req.t_first = now
                self._finish(req, now)
                continue
            if not after_step:
                req.t_first = now
            heapq.heappush(self.running, (self.steps + req.output_len - 1, req.index, req))
            self.context += req.input_len + 1
            req.join_step = self.steps
        self.ready.clear()
        self.try_admit(now)
        if not self.running:
            return
        self.busy = True
        self.sim.work(now, self, self.sim.profile.decode_time(len(self.running), self.context),
                      self.step_done)

    def step_done(self, now: float) -> None:
        self.busy = False
        self.steps += 1
        self.step_ends.append(now)
        self.context += len(self.running)
        while self.running and self.running[0][0] <= self.steps:
            req = heapq.heappop(self.running)[2]
            self.context -= req.input_len + req.output_len
            self._finish(req, now)
        self.kick(now)

    def _finish(self, req: SimRequest, now: float) -> None:
        if req.output_len > 1:
            ends = self.step_ends[req.join_step:self.steps]
            if req.t_first is None:  # token 1 comes with the first step's token
                req.t_first = ends[0]
            req.token_times = [req.t_first, *ends]
        else:
            req.token_times = [req.t_first]
        req.t_done = now
        self.kv_used -= req.input_len + req.output_len
        self.sim.finished(req, now)


class Simulator:
    """One run of one deployment under one load. Deterministic for given seeds."""

    def __init__(self, profile: Profile, deployment: Deployment,
                 workload: Workload | MultiTurn) -> None:
        self.profile, self.deployment, self.workload = profile, deployment, workload
        self.multi_turn = workload if isinstance(workload, MultiTurn) else None

    # -- the event queue ---------------------------------------------------------------
    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def soon(self, worker, now: float) -> None:
        """worker.kick(now) after every other event at `now`: requests that arrive at the
        same instant go into the same step, whatever order their events ran in."""
        if worker not in self._kicks:
            self._kicks.add(worker)
            self.at(now, self._kick, worker)

    def _kick(self, now: float, worker) -> None:
        self._kicks.discard(worker)
        worker.kick(now)

    def work(self, now: float, worker, seconds: float, fn, *args) -> None:
        """Run a step of `seconds` (at full speed) on `worker`, then call fn(t, *args).

        With profile.cpu_cores = c > 0 the busy workers share c cores (processor
        sharing): each progresses at min(1, c / busy), so a change in the number of busy
        workers re-times every step in progress."""
        if self.profile.cpu_cores <= 0:
            self.at(now + seconds, fn, *args)
            return
        self._advance(now)
        self._active[worker] = [seconds, fn, args, 0]
        self._retime(now)

    def _rate(self) -> float:
        return min(1.0, self.profile.cpu_cores / max(1, len(self._active)))

    def _advance(self, now: float) -> None:
        done = (now - self._shared_t) * self._rate()
        for step in self._active.values():
            step[0] -= done
        self._shared_t = now

    def _retime(self, now: float) -> None:
        rate = self._rate()
        for worker, step in self._active.items():
            step[3] = next(self._seq)  # unique: every earlier end of this worker is stale
            self.at(now + max(0.0, step[0]) / rate, self._step_end, worker, step[3])

    def _step_end(self, now: float, worker, version: int) -> None:
        step = self._active.get(worker)
        if step is None or step[3] != version:
            return
        self._advance(now)
        del self._active[worker]
        self._retime(now)
        step[1](now, *step[2])

    # -- requests ----------------------------------------------------------------------
    def run(self, load: FixedLoad | RateLoad) -> list[SimRequest]:
        """Simulate `load` to the end; returns every request, in issue order."""
        if load.number < 1:
            raise ValueError("number of requests must be >= 1")
        self._events, self._seq = [], itertools.count()
        self._kicks: set = set()
        self._active, self._shared_t = {}, 0.0  # worker -> [work left, fn, args, version]
        self.prefills = [_Prefill(self) for _ in range(self.deployment.prefill)]
        self.decodes = [_Decode(self) for _ in range(self.deployment.decode)]
        if self.multi_turn is not None:
            return self._run_conversations(load)
        inp, out = self.workload.sample(load.number)
        self.requests = [SimRequest(i, int(a), int(b)) for i, (a, b) in enumerate(zip(inp, out))]
        self._next, self._on_finish = 0, None
        if isinstance(load, FixedLoad):
            if load.parallel < 1:
                raise ValueError("parallel must be >= 1")
            self._on_finish = self.send  # a client sends its next request when one ends
            for _ in range(min(load.parallel, load.number)):
                self.send(0.0)
        else:
            if load.rate <= 0:
                raise ValueError("rate must be > 0")
            gaps = np.random.default_rng(load.seed).exponential(1.0 / load.rate, load.number)
            for t in np.cumsum(gaps) - gaps[0]:
                self.at(float(t), self.send)
        self._drain()
        return self.requests

    def _drain(self) -> None:
        while self._events:
            t, _, fn, args = heapq.heappop(self._events)
            fn(t, *args)

    # -- multi-turn --------------------------------------------------------------------
    def _run_conversations(self, load: FixedLoad | RateLoad) -> list[SimRequest]:
        """load.parallel clients, each running conversations until load.number are done."""
        if not isinstance(load, FixedLoad):
            raise ValueError("multi-turn simulations take a FixedLoad (conversations at once)")
        if load.parallel < 1:
            raise ValueError("parallel must be >= 1")
        self.requests, self._next_conv, self._convs = [], 0, {}
        for _ in range(min(load.parallel, load.number)):
            self._start_conversation(0.0, load.number)
        self._drain()
        return self.requests

    def _start_conversation(self, now: float, total: int) -> None:
        if self._next_conv >= total:
            return
        c = self._next_conv
        self._next_conv += 1
        self._convs[c] = (*self.multi_turn.conversation(c), total)
        self._send_turn(now, c, 1)

    def _send_turn(self, now: float, conv: int, turn: int) -> None:
        users, outputs, _ = self._convs[conv]
        req = SimRequest(len(self.requests), self.multi_turn.input_len(users, outputs, turn),
                         outputs[turn - 1], conversation=conv, turn=turn)
        self.requests.append(req)
        req.t_send = now
        self.at(now + self.profile.client_overhead, self._route, req)

    def _turn_done(self, req: SimRequest, now: float) -> None:
        users, outputs, total = self._convs[req.conversation]
        if req.turn < len(users):
            self.at(now + self.multi_turn.think_time, self._send_turn, req.conversation,
                    req.turn + 1)
        else:
            del self._convs[req.conversation]
            self._start_conversation(now, total)

    def send(self, now: float) -> None:
        if self._next >= len(self.requests):
            return
        req = self.requests[self._next]
        self._next += 1
        req.t_send = now
        # round robin over prefill and over decode workers, like the gateway's default
        self.at(now + self.profile.client_overhead, self._route, req)

    def _route(self, now: float, req: SimRequest) -> None:
        req.prefill = self.prefills[req.index % len(self.prefills)]
        req.decode = self.decodes[req.index % len(self.decodes)]
        req.prefill.arrive(req, now)
        req.decode.arrive(req, now)

    def maybe_transfer(self, req: SimRequest, now: float) -> None:
        """Start the KV transfer once the prompt is computed and decode pages are held."""
        if req.t_prefill_done is None or req.t_admit is None:
            return
        self.at(now + self.profile.transfer_time(req.input_len), req.decode.on_ready, req)

    def finished(self, req: SimRequest, now: float) -> None:
        if req.conversation >= 0:
            self._turn_done(req, now)
        elif self._on_finish is not None:
            self._on_finish(now)
