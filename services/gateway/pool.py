"""The gateway's view of the mesh: workers followed through the registry's Watch stream.

`WorkerPool.start()` (inside the gateway's event loop) follows the registry with
pdmesh.registry_watch.RegistryWatch and applies its events (JOINED, LEFT, EXPIRED,
UPDATED with load). When the stream breaks (registry restarted or unreachable) it
reconnects every `reconnect_s`, keeping the last known workers routable meanwhile; on
reconnecting, the member list replaces the pool: members that vanished stay routable for
`stale_s` (one lease: a restarted registry starts empty and its workers re-register
within a heartbeat interval, under new ids) unless one registers at the same address.

`route(exclude, tokens)` picks what serves one request (the prompt's token ids go to
policies that use them: cache_aware, cache_cost, prefix_hash):
  - mode "pd": a (prefill, decode) pair, each by its own policy;
  - mode "colocated": one colocated worker (decode policy);
  - mode "auto": a pair when at least one prefill and one decode worker exist,
    otherwise a colocated worker. Colocated workers are the small-deployment path
    and the baseline; when both kinds exist, "auto" prefers PD.
A pair's request may then be prefilled on its decode worker instead (per-request
disaggregation, --pd-mode: services/gateway/pd_mode.py): the route has no prefill and
carries the decider's Ticket. The worker that prefills a route is charged its prompt's
uncached tokens (Worker.pending_prefill_tokens, what cache_cost reads) until the route's
first token (`prefilled(route)`) or its end (`release(route)`).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Sequence

from pdmesh.config import GatewayConfig, ROUTING_MODES, registry_config_from_env
from pdmesh.registry_watch import RegistryWatch
from pdmesh.v1 import registry_pb2 as rpb
from pdmesh.services.gateway.breaker import Breakers
from pdmesh.services.gateway.pd_mode import LOCAL, PdModeDecider, Ticket
from pdmesh.services.gateway.routing import Load, Policy, Worker, make_policy

log = logging.getLogger(__name__)
MODES = ROUTING_MODES  # auto | pd | colocated
_ROLES = {rpb.WORKER_ROLE_PREFILL: "PREFILL", rpb.WORKER_ROLE_DECODE: "DECODE",
          rpb.WORKER_ROLE_COLOCATED: "COLOCATED"}


class NoRoute(Exception):
    """No worker (or no complete prefill + decode pair) can serve the request."""


@dataclass(frozen=True)
class Route:
    """Where one request goes: prefill is None on a colocated worker."""

    prefill: Worker | None
    decode: Worker
    why: str = ""  # the policies and what they chose from (traces show it)
    # what token-aware policies said of their pick, e.g. ("prefill.match_rate", 0.9)
    detail: tuple[tuple[str, object], ...] = ()
    # per-request disaggregation's choice for a pair (None: no decider, or no pair)
    ticket: Ticket | None = None
    # the prompt tokens charged to the worker that prefills it (see prefilled())
    charge: PrefillCharge | None = None


@dataclass(eq=False)
class PrefillCharge:
    """Prompt tokens a route added to its prefilling worker's pending_prefill_tokens;
    taken back once, at the route's first token or its end."""

    worker_id: str
    tokens: int
    open: bool = True


def worker_from_proto(info: rpb.WorkerInfo) -> Worker | None:
    role = _ROLES.get(info.role)
    if role is None:
        return None
    ld, kv = info.load, info.kv_layout
    reuse = info.kv_reuse if info.HasField("kv_reuse") else None  # None: an older worker
    return Worker(info.worker_id, role, info.address, info.model_id,
                  Load(ld.running, ld.queued, ld.free_kv_pages, ld.queued_prefill_tokens),
                  kv_bytes_per_token=kv.bytes_per_page / kv.page_size if kv.page_size else 0.0,
                  prefix_cache=reuse.prefix_cache if reuse else True,
                  reuses_adopted_kv=reuse.adopted_kv if reuse else True)


def _load(w: Worker) -> str:
    """A worker's load as routing saw it, for Route.why."""
    return (f"running {w.load.running}, queued {w.load.queued}, in flight {w.inflight}, "
            f"free pages {w.load.free_kv_pages}")


def _pick(policy: Policy, candidates: list[Worker], tokens: Sequence[int] | None,
          leg: str) -> tuple[Worker, tuple[tuple[str, object], ...]]:
    """The policy's pick (given the tokens if it wants them) and what it said of it."""
    if not getattr(policy, "wants_tokens", False):
        return policy(candidates), ()
    w = policy(candidates, tokens=tokens)
    return w, tuple((f"{leg}.{k}", v) for k, v in getattr(policy, "last_detail", {}).items())


def _said(detail: tuple[tuple[str, object], ...]) -> str:
    """A policy's detail for Route.why: ", match_rate 0.9, balance_override False"."""
    return "".join(f", {k.split('.', 1)[1]} {v}" for k, v in detail)


class WorkerPool:
    """Thread-safe set of routable workers, fed by `Registry.Watch` (or by hand in tests)."""

    def __init__(self, registry_addr: str | None = None, mode: str = "auto",
                 prefill_policy: str = "round_robin", decode_policy: str = "round_robin",
                 reconnect_s: float = 0.5, breakers: Breakers | None = None,
                 stale_s: float | None = None, config: GatewayConfig | None = None,
                 pd_mode: PdModeDecider | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown routing mode {mode!r} (known: {', '.join(MODES)})")
        self.mode = mode
        # config: the cache_aware / prefix_hash settings (GatewayConfig() by default)
        self.prefill_policy: Policy = make_policy(prefill_policy, config)
        self.decode_policy: Policy = make_policy(decode_policy, config)
        self.policy_names = (prefill_policy, decode_policy)
        self.breakers = breakers or Breakers()
        self.pd_mode = pd_mode  # remote or local prefill, per request (None: remote)
        self._registry_addr = registry_addr
        self._reconnect_s = reconnect_s
        self._workers: dict[str, Worker] = {}
        # worker id -> when a resync missed it (kept for stale_s: registry restarts)
        self._stale: dict[str, float] = {}
        self.stale_s = registry_config_from_env().lease_s if stale_s is None else stale_s
        self._lock = threading.Lock()
        self._watch: RegistryWatch | None = None
        self.synced = threading.Event()  # set once a member list was applied

    # ---- membership -------------------------------------------------------------
    def apply(self, event_type: str, info: rpb.WorkerInfo) -> None:
        """Apply one membership event ("JOINED", "LEFT", "EXPIRED", "UPDATED")."""
        w = worker_from_proto(info)
        if w is None:
            return
        with self._lock:
            if event_type == "JOINED" and self._stale:  # its old id, from before a resync
                for wid in [wid for wid in self._stale
                            if self._workers[wid].address == w.address]:
                    self._drop(wid)
            if event_type in ("LEFT", "EXPIRED"):
                self._drop(w.worker_id)
            elif event_type == "UPDATED" and w.worker_id in self._workers:
                self._workers[w.worker_id].load = w.load
            elif event_type in ("JOINED", "UPDATED"):
                old = self._workers.get(w.worker_id)
                w.inflight = old.inflight if old else 0
                w.pending_prefill_tokens = old.pending_prefill_tokens if old else 0
                self._workers[w.worker_id] = w

    def _drop(self, wid: str) -> None:  # under _lock
        self._workers.pop(wid, None)
        self._stale.pop(wid, None)
        self.breakers.forget(wid)
        for policy in (self.prefill_policy, self.decode_policy, self.pd_mode):
            if hasattr(policy, "forget"):  # cache_aware drops the worker's tree
                policy.forget(wid)

    def _expire_stale(self) -> None:  # under _lock
        if self._stale:
            old = time.monotonic() - self.stale_s
            for wid in [wid for wid, t in self._stale.items() if t <= old]:
                self._drop(wid)

    def workers(self, role: str | None = None) -> list[Worker]:
        """A snapshot of the members (of one role)."""
        with self._lock:
            self._expire_stale()
            return [w for w in self._workers.values() if role in (None, w.role)]

    def model_ids(self) -> list[str]:
        with self._lock:
            return sorted({w.model_id for w in self._workers.values()})

    # ---- routing ----------------------------------------------------------------
    def route(self, exclude: frozenset[str] = frozenset(),
              tokens: Sequence[int] | None = None) -> Route:
        """Pick the workers for one request and count it in flight; NoRoute when none.
        `exclude`: worker ids to avoid (a retry's failed workers) unless nothing else is
        left; `tokens`: the prompt's ids, for token-aware policies. Call
        `release(route)` when the request ends."""
        with self._lock:
            self._expire_stale()
            by_role: dict[str, list[Worker]] = {"PREFILL": [], "DECODE": [], "COLOCATED": []}
            for w in self._workers.values():
                by_role[w.role].append(w)
            by_role = {role: self.breakers.usable(ws, exclude) for role, ws in by_role.items()}
            use_pd = self.mode == "pd" or (
                self.mode == "auto" and by_role["PREFILL"] and by_role["DECODE"])
            if use_pd:
                if not by_role["PREFILL"] or not by_role["DECODE"]:
                    raise NoRoute("no prefill + decode worker pair is registered "
                                  f"({len(by_role['PREFILL'])} prefill, "
                                  f"{len(by_role['DECODE'])} decode)")
                route = self._pair(by_role, tokens)
            elif by_role["COLOCATED"]:
                d, ddet = _pick(self.decode_policy, by_role["COLOCATED"], tokens, "decode")
                route = Route(None, d, f"colocated: {self.policy_names[1]} of "
                              f"{len(by_role['COLOCATED'])} ({_load(d)}{_said(ddet)})", ddet)
            else:
                raise NoRoute("no worker is registered that can serve this request "
                              f"(routing mode {self.mode})")
            for w in (route.prefill, route.decode):
                if w is not None:
                    w.inflight += 1
                    self.breakers.taken(w)
            return self._charge(route, tokens)

    def _charge(self, route: Route, tokens: Sequence[int] | None) -> Route:  # under _lock
        """Charge the prompt's uncached tokens (the policy's estimate, else all of them)
        to the worker that prefills it: the prefill, or the decode/colocated worker."""
        w, leg = (route.prefill, "prefill") if route.prefill else (route.decode, "decode")
        n = dict(route.detail).get(f"{leg}.uncached_tokens", len(tokens or ()))
        if not n:
            return route
        w.pending_prefill_tokens += n
        return replace(route, charge=PrefillCharge(w.worker_id, n))

    def prefilled(self, route: Route) -> None:
        """The route's first token came: its prompt is no longer queued for prefill."""
        with self._lock:
            self._settle(route)

    def _settle(self, route: Route) -> None:  # under _lock
        c = route.charge
        if c is not None and c.open:
            c.open = False
            w = self._workers.get(c.worker_id)  # the current object, if it re-joined
            if w is not None:
                w.pending_prefill_tokens = max(0, w.pending_prefill_tokens - c.tokens)

    def _pair(self, by_role: dict[str, list[Worker]], tokens: Sequence[int] | None) -> Route:
        """A (prefill, decode) pair by the two policies; then, with a decider and the
        prompt, remote or local prefill (local: the route has no prefill)."""
        p, pdet = _pick(self.prefill_policy, by_role["PREFILL"], tokens, "prefill")
        d, ddet = _pick(self.decode_policy, by_role["DECODE"], tokens, "decode")
        decode_why = (f"decode {self.policy_names[1]} of {len(by_role['DECODE'])} "
                      f"({_load(d)}{_said(ddet)})")
        ticket = None if self.pd_mode is None or tokens is None else \
            self.pd_mode.choose(p, d, tokens, pdet + ddet)
        if ticket is not None and ticket.mode == LOCAL:
            return Route(None, d, f"{ticket.why()}: {decode_why}", ddet, ticket)
        why = (f"pd: prefill {self.policy_names[0]} of {len(by_role['PREFILL'])} "
               f"({_load(p)}{_said(pdet)}), {decode_why}")
        return Route(p, d, why + (f"; {ticket.why()}" if ticket else ""), pdet + ddet, ticket)

    def release(self, route: Route) -> None:
        if route.ticket is not None:
            route.ticket.ended()
        with self._lock:
            self._settle(route)
            for w in (route.prefill, route.decode):
                if w is not None:
                    w.inflight = max(0, w.inflight - 1)
                    self.breakers.done(w)

    def has_route(self) -> bool:
        try:
            self.release(self.route())
            return True
        except NoRoute:
            return False

    # ---- following the registry -----------------------------------------------
    def start(self) -> None:
        """Follow the registry (call inside the running event loop) until `close`."""
        self._watch = RegistryWatch(self._registry_addr, self.apply, self._reconnect_s,
                                    on_sync=self._replace).start()

    def _replace(self, members) -> None:
        ids = {info.worker_id for info in members}
        now = time.monotonic()
        with self._lock:
            for wid in [wid for wid in self._workers if wid not in ids]:
                self._stale.setdefault(wid, now)  # until it re-registers, or stale_s
            for wid in ids:
                self._stale.pop(wid, None)
        for info in members:
            self.apply("JOINED", info)
        self.synced.set()

    def close(self) -> None:
        """Stop following the registry (on the event loop's thread)."""
        if self._watch is not None:
            self._watch.cancel()
