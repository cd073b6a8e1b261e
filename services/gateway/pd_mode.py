"""Per-request disaggregation: prefill one request on a prefill worker (remote, the KV
then moves to the decode worker) or on the decode worker itself (local: no transfer hop,
but the decode's running streams wait while it prefills). SGLang and Dynamo call this
conditional disaggregation.

`PdModeDecider.choose(prefill, decode, tokens, detail)` runs inside WorkerPool.route once
the pair is picked, and returns a `Ticket`: the choice, both predicted TTFTs
(services/gateway/pd_cost.py) and the situation they came from. Policies (--pd-mode):

  always  remote (pdmesh's behaviour before this existed; the default)
  never   local: every prompt is prefilled by its decode worker
  auto    local when the local prefill stalls the decode no longer than max_stall_s and
          its cost (TTFT + stall_weight · running streams · stall) is below remote's TTFT

What the decider knows, with no RPC of its own:
  - uncached tokens: with cache_aware routing, the prefill policy's match rate (remote)
    and a prefix tree of the prompts this gateway sent to each decode (local: the
    decode's prefix cache keeps its local prefills and, with decode-side reuse, the KV
    it adopted; a prompt enters the tree only where the decode caches it, as it
    announced in the registry's KvReuse); else the whole prompt. With decode-side reuse
    the same tree says how much of the prompt's KV the decode already has, which a
    remote prefill then does not send; without it a remote prefill sends it all;
  - queues: a virtual finish time per prefill worker and per decode worker's local
    prefills (each chosen request adds its predicted prefill time; a measured first token
    corrects the rest by its error; an empty queue resets), floored by the prefill
    worker's reported queued prefill tokens;
  - the decode's running batch (the streams a local prefill stalls): its reported running
    requests, or this gateway's requests in flight there less those still waiting for
    their first token (prefilling somewhere: not decoding yet), whichever is more;
  - KV bytes per token: the decode worker's layout in the registry.

The dispatcher tells the ticket what happened: `first_token()` (measured TTFT: metrics,
overhead calibration, queue correction), `prefill_done(response)` (PD: the prefill
worker's compute and write times and its cached tokens calibrate the model) and the pool's release calls
`ended()`. Thread-safe: one lock around the model and the queues.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence


from pdmesh.config import PD_MODES, GatewayConfig
from pdmesh.sim.profile import Profile
from pdmesh.services.gateway.pd_cost import (DEFAULT_PROFILE, CostModel, Estimate,
                                             Situation)
from pdmesh.services.gateway.pd_metrics import PdModeMetrics
from pdmesh.services.gateway.prefix_tree import PrefixTree, split
from pdmesh.services.gateway.routing import Worker

REMOTE, LOCAL = "remote", "local"
_CHUNK = 16  # tokens per prefix-tree chunk (the workers' default page size)


def _caches(decode: Worker, mode: str) -> bool:
    """Whether `decode` keeps a prompt's KV in its prefix cache after prefilling it
    itself (LOCAL) or adopting it from a prefill worker (REMOTE: decode-side reuse)."""
    return decode.prefix_cache if mode == LOCAL else decode.reuses_adopted_kv


@dataclass(eq=False)
class Ticket:
    """One routed attempt: the choice, its prediction, and what came back."""

    decider: "PdModeDecider"
    mode: str  # REMOTE | LOCAL
    policy: str  # always | never | auto
    situation: Situation
    estimate: Estimate
    queue: str  # the queue it joined: a prefill worker id, or "local:" + decode id
    t_route: float
    decode_id: str = ""
    shift0: float = 0.0  # its queue's correction so far when it joined
    alone: bool = False  # its queue was empty when it joined: its prefill ran by itself
    measured_s: float | None = None  # routing -> first token
    timings: Any = None  # PD: the prefill's PrefillTimings
    open: bool = True  # still counted in its queue

    @property
    def predicted_s(self) -> float:
        """Predicted TTFT of the choice made."""
        e = self.estimate
        return e.ttft_remote if self.mode == REMOTE else e.ttft_local

    def why(self) -> str:
        """One line for Route.why: the choice and both predictions."""
        e = self.estimate
        return (f"{self.mode} prefill ({self.policy}: predicted TTFT remote "
                f"{e.ttft_remote * 1e3:.0f} ms, local {e.ttft_local * 1e3:.0f} ms, stall "
                f"{e.stall_s * 1e3:.0f} ms x {self.situation.decode_running} streams)")

    def attributes(self) -> dict[str, object]:
        """Route span attributes (pdmesh.route. + these keys)."""
        e, s = self.estimate, self.situation
        return {"pd_mode": self.mode, "pd_mode.policy": self.policy,
                "pd_mode.predicted_ttft_s": round(self.predicted_s, 6),
                "pd_mode.predicted_ttft_remote_s": round(e.ttft_remote, 6),
                "pd_mode.predicted_ttft_local_s": round(e.ttft_local, 6),
                "pd_mode.stall_s": round(e.stall_s, 6),
                "pd_mode.uncached_remote": s.uncached_remote,
                "pd_mode.uncached_local": s.uncached_local}

    def first_token(self) -> None:
        self.decider._first_token(self)

    def prefill_done(self, response: Any) -> None:
        """PD: the prefill's PrefillResponse (timings, cached_tokens) came back."""
        self.decider._prefill_done(self, response)

    def ended(self) -> None:
        self.decider._close(self)


@dataclass
class _Queue:
    busy_until: float = 0.0  # virtual finish time of the last prefill in it
    # corrections applied so far (measured minus predicted first tokens): a ticket's
    # prediction, made when it joined, is off by what was corrected since
    shift: float = 0.0
    open: int = 0  # tickets still in it


class PdModeDecider:
    """Chooses remote or local prefill per request (see the module doc)."""

    def __init__(self, policy: str = "always", model: CostModel | None = None,
                 max_stall_s: float = 0.25, metrics: PdModeMetrics | None = None,
                 max_tree_size: int = 1 << 26, clock=time.monotonic) -> None:
        if policy not in PD_MODES:
            raise ValueError(f"pd_mode must be one of {', '.join(PD_MODES)}, got {policy!r}")
        self.policy, self.model = policy, model or CostModel()
        self.max_stall_s, self.metrics, self.clock = max_stall_s, metrics, clock
        self.max_tree_size = max_tree_size
        self._queues: dict[str, _Queue] = {}
        self._prefilling: dict[str, int] = {}  # decode id -> our tickets before token 1
        self._trees: dict[str, PrefixTree] = {}  # decode id -> prompts sent there
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: GatewayConfig, metrics: PdModeMetrics | None = None
                    ) -> "PdModeDecider":
        """From GatewayConfig's pd_mode* fields (the profile file read here: ValueError
        when it cannot be)."""
        profile = Profile.load(config.pd_mode_profile) if config.pd_mode_profile \
            else DEFAULT_PROFILE
        decider = cls(config.pd_mode, CostModel(profile, config.pd_mode_stall_weight),
                      config.pd_mode_max_stall_s, metrics, config.max_tree_size)
        if metrics is not None:
            metrics.watch(decider)
        return decider

    def coefficients(self) -> dict[str, float]:
        """The cost model's calibrated coefficients now."""
        with self._lock:
            return self.model.snapshot()

    # -- choosing ----------------------------------------------------------------------
    def choose(self, prefill: Worker, decode: Worker, tokens: Sequence[int],
               detail: Sequence[tuple[str, object]] = ()) -> Ticket:
        """Remote or local for this prompt on this pair (counted in its queue until its
        first token or its end)."""
        with self._lock:
            now = self.clock()
            said = dict(detail)
            chunks = split(tokens, _CHUNK) if self._cache_aware(said) else []
            situation = self._situation(prefill, decode, tokens, chunks, said, now)
            est = self.model.estimate(situation)
            mode = self._decide(est)
            queue = prefill.worker_id if mode == REMOTE else "local:" + decode.worker_id
            ticket = Ticket(self, mode, self.policy, situation, est, queue, now,
                            decode.worker_id)
            self._prefilling[decode.worker_id] = self._prefilling.get(decode.worker_id, 0) + 1
            q = self._queues.setdefault(queue, _Queue())
            n = situation.uncached_remote if mode == REMOTE else situation.uncached_local
            q.busy_until = max(q.busy_until, now) + self.model.prefill_time(n)
            ticket.shift0, ticket.alone = q.shift, q.open == 0
            q.open += 1
            if chunks and _caches(decode, mode):  # the prompt is in its prefix cache now
                self._tree(decode.worker_id).insert(chunks)
        if self.metrics is not None:
            self.metrics.requests.labels(mode).inc()
        return ticket

    def _decide(self, est: Estimate) -> str:
        if self.policy == "always":
            return REMOTE
        if self.policy == "never":
            return LOCAL
        if est.stall_s <= self.max_stall_s and est.cost_local < est.cost_remote:
            return LOCAL
        return REMOTE

    def _situation(self, prefill: Worker, decode: Worker, tokens: Sequence[int], chunks,
                   detail: dict[str, object], now: float) -> Situation:
        n = len(tokens)
        uncached_remote = uncached_local = n
        if self._cache_aware(detail):
            rate = float(detail.get("prefill.match_rate", 0.0))
            uncached_remote = max(1, n - int(rate * n))
            tree = self._trees.get(decode.worker_id)
            uncached_local = max(1, n - (tree.match(chunks) if tree else 0))
        # decode-side reuse off: its cached prefix is no use to a remote prefill's KV
        transfer_tokens = uncached_local if decode.reuses_adopted_kv else n
        pq = self._queues.get(prefill.worker_id)
        lq = self._queues.get("local:" + decode.worker_id)
        reported = self.model.prefill_time(prefill.load.queued_prefill_tokens)
        return Situation(
            n, uncached_remote, uncached_local,
            prefill_wait_s=max(pq.busy_until - now if pq else 0.0, reported, 0.0),
            local_wait_s=max(lq.busy_until - now if lq else 0.0, 0.0),
            decode_running=max(decode.load.running,
                               decode.inflight - self._prefilling.get(decode.worker_id, 0)),
            kv_bytes_per_token=decode.kv_bytes_per_token, transfer_tokens=transfer_tokens)

    @staticmethod
    def _cache_aware(detail: dict[str, object]) -> bool:
        """A token-aware cache policy routed this pair (its match rate is in `detail`)."""
        return "prefill.match_rate" in detail or "decode.match_rate" in detail

    def _tree(self, decode_id: str) -> PrefixTree:
        tree = self._trees.get(decode_id)
        if tree is None:
            tree = self._trees[decode_id] = PrefixTree(self.max_tree_size, _CHUNK)
        return tree

    def forget(self, worker_id: str) -> None:
        """The worker left the pool: drop its queue and tree."""
        with self._lock:
            self._queues.pop(worker_id, None)
            self._queues.pop("local:" + worker_id, None)
            self._trees.pop(worker_id, None)
            self._prefilling.pop(worker_id, None)

    # -- what came back ----------------------------------------------------------------
    def _first_token(self, t: Ticket) -> None:
        with self._lock:
            if t.measured_s is not None:
                return
            now = self.clock()
            t.measured_s = now - t.t_route
            q = self._queues.get(t.queue)
            if q is not None and t.open and q.open > 1:
                # the queue's later prefills end as much later (or sooner) as this one did
                # than predicted, counting what earlier first tokens corrected already
                error = t.measured_s - t.predicted_s - (q.shift - t.shift0)
                q.shift += error
                q.busy_until = max(q.busy_until + error, now)
            self._release(t, now)
            if t.mode == LOCAL:
                s = t.situation
                self.model.observe_overhead(LOCAL, t.measured_s - (
                    s.local_wait_s + self.model.decode_step(s.decode_running) / 2
                    + self.model.prefill_time(s.uncached_local)))
            else:
                self._remote_overhead(t)
        if self.metrics is not None:
            m = self.metrics
            m.ttft.labels(t.mode, "predicted").observe(t.predicted_s)
            m.ttft.labels(t.mode, "measured").observe(t.measured_s)
            m.error.labels(t.mode).observe(abs(t.measured_s - t.predicted_s))

    def _prefill_done(self, t: Ticket, response: Any) -> None:
        """PD: the prefill's timings calibrate the prefill and transfer models (against
        the tokens it really computed: its prefix cache may have held more than the
        gateway knew)."""
        with self._lock:
            t.timings = timings = response.timings
            s = t.situation
            if t.alone:  # else its prefill step(s) may have computed other prompts too
                self.model.observe_prefill(s.prompt_tokens - response.cached_tokens,
                                           timings.prefill_s)
            self.model.observe_transfer(  # the pages sent, as far as we know
                s.transfer_tokens * (s.kv_bytes_per_token or self.model.profile.kv_bytes_per_token),
                timings.transfer_s)
            self._remote_overhead(t)

    def _remote_overhead(self, t: Ticket) -> None:  # under _lock
        """Once both the first token and the prefill's timings are in: the overhead."""
        p = t.timings
        if t.measured_s is not None and p is not None:
            self.model.observe_overhead(REMOTE, t.measured_s - (
                p.queue_s + p.prefill_s + p.transfer_s))

    def _close(self, t: Ticket) -> None:
        with self._lock:
            self._release(t, self.clock())

    def _release(self, t: Ticket, now: float) -> None:  # under _lock
        if not t.open:
            return
        t.open = False
        if t.decode_id in self._prefilling:
            self._prefilling[t.decode_id] = max(0, self._prefilling[t.decode_id] - 1)
        q = self._queues.get(t.queue)
        if q is not None:
            q.open -= 1
            if q.open <= 0:  # nothing of ours left in it: not busy any longer
                q.open, q.busy_until, q.shift = 0, now, 0.0
