"""cache_aware and prefix_hash routing (services/gateway/routing.py): the policies alone,
through a WorkerPool (token ids, route detail, a leaving worker's tree dropped), and their
settings (GatewayConfig, env, `pdmesh gateway` / `pdmesh serve` flags)."""
from __future__ import annotations

import argparse
import collections
import random

import pytest

from pdmesh.commands import gateway as gateway_cmd
from pdmesh.commands import serve as serve_cmd
from pdmesh.config import GatewayConfig, gateway_config_from_env
from pdmesh.services.gateway.pool import WorkerPool
from pdmesh.services.gateway.routing import (CacheAwarePolicy, Load, PrefixHashPolicy, Worker,
                                             make_policy)
from pdmesh.v1 import registry_pb2 as rpb

SYSTEM = list(range(1000, 1200))  # a 200-token shared system prompt
RATE = 192 / 220  # prompt(i) vs prompt(j): 12 whole 16-token chunks of 220 tokens


def workers(n: int, role: str = "PREFILL") -> list[Worker]:
    return [Worker(f"w{i}", role, f"10.0.0.{i}:1", "m") for i in range(n)]


def prompt(i: int, shared: list[int] = SYSTEM, tail: int = 20) -> list[int]:
    return shared + [i] * tail


# ---- cache_aware -----------------------------------------------------------------------
def test_cache_aware_sends_a_shared_prefix_to_the_same_worker():
    ws, policy = workers(3), CacheAwarePolicy()
    first = policy(ws, tokens=prompt(0))
    assert policy.last_detail == {"match_rate": 0.0, "balance_override": False,
                                  "choice": "smallest_tree"}
    for i in range(1, 6):
        assert policy(ws, tokens=prompt(i)) is first
        assert policy.last_detail["choice"] == "cache"
        assert policy.last_detail["match_rate"] == pytest.approx(RATE, abs=1e-3)


def test_cache_aware_spreads_unrelated_prompts_to_the_smallest_tree():
    ws, policy = workers(3), CacheAwarePolicy()
    rng = random.Random(0)
    picks = [policy(ws, tokens=[rng.randrange(50_000) for _ in range(100)]).worker_id
             for _ in range(6)]
    assert picks == ["w0", "w1", "w2"] * 2
    assert policy.last_detail["choice"] == "smallest_tree"


def test_cache_aware_low_match_goes_to_the_smallest_tree():
    ws, policy = workers(2), CacheAwarePolicy(cache_threshold=0.5)
    a = policy(ws, tokens=prompt(0, tail=100))  # w0 (both empty: first by id)
    big = [7] * 500
    policy(ws, tokens=big)  # w1 (smaller tree)
    policy(ws, tokens=big)  # w1 again, it matches fully
    # shares 200 of 700 tokens with w0's prompt: 0.29 <= 0.5, so w0's match loses
    p = prompt(1, tail=500)
    assert policy(ws, tokens=p).worker_id == "w0" == a.worker_id  # w0's tree is smaller
    assert policy.last_detail["choice"] == "smallest_tree"
    assert 0.25 < policy.last_detail["match_rate"] < 0.3


def test_cache_aware_imbalance_overrides_the_cache():
    ws, policy = workers(2), CacheAwarePolicy()
    home = policy(ws, tokens=prompt(0))
    other = next(w for w in ws if w is not home)
    home.load, other.load = Load(running=100), Load(running=40)  # 60 <= 64: balanced
    assert policy(ws, tokens=prompt(1)) is home
    home.load, other.load = Load(running=200), Load(running=135)  # 65 > 64, 200 < 202.5
    assert policy(ws, tokens=prompt(2)) is home
    assert policy.last_detail["balance_override"] is False
    home.load, other.load = Load(running=100), Load()  # 100 - 0 > 64 and 100 > 0 * 1.5
    assert policy(ws, tokens=prompt(3)) is other
    assert policy.last_detail["balance_override"] is True
    assert policy.last_detail["match_rate"] > 0.8  # the cache would have said `home`
    home.load, other.inflight = Load(), 70  # in flight from here counts as load too
    assert policy(ws, tokens=prompt(4)) is home
    assert policy.last_detail["choice"] == "balance"


def test_cache_aware_tree_is_bounded_and_forgotten():
    ws, policy = workers(2), CacheAwarePolicy(max_tree_size=500)
    for i in range(50):
        policy(ws, tokens=[i] * 300)
    assert all(t.size <= 500 for t in policy.trees.values())
    policy.forget("w0")
    assert set(policy.trees) == {"w1"}


def test_cache_aware_without_tokens_picks_and_stores_nothing():
    ws, policy = workers(2), CacheAwarePolicy()
    assert policy(ws) in ws and policy(ws, tokens=[]) in ws
    assert all(t.size == 0 for t in policy.trees.values())


# ---- prefix_hash -----------------------------------------------------------------------
def test_prefix_hash_is_stable_and_reads_only_the_prefix():
    ws, policy = workers(4), PrefixHashPolicy(prefix_token_count=256)
    rng = random.Random(1)
    for _ in range(50):
        head = [rng.randrange(50_000) for _ in range(256)]
        w = policy(ws, tokens=head + [1, 2, 3])
        assert policy(ws, tokens=head + [9] * 40) is w  # same 256 first tokens
        assert policy(list(reversed(ws)), tokens=head) is w  # order does not matter
    spread = collections.Counter(
        policy(ws, tokens=[rng.randrange(50_000) for _ in range(8)]).worker_id
        for _ in range(4000))
    assert len(spread) == 4 and all(700 < c < 1300 for c in spread.values()), spread


def test_prefix_hash_moves_about_one_in_n_keys_when_a_worker_joins():
    policy, rng = PrefixHashPolicy(), random.Random(2)
    keys = [[rng.randrange(50_000) for _ in range(32)] for _ in range(4000)]
    four, five = workers(4), workers(5)
    before = [policy(four, tokens=k).worker_id for k in keys]
    after = [policy(five, tokens=k).worker_id for k in keys]
    moved = [(a, b) for a, b in zip(before, after) if a != b]
    assert all(b == "w4" for _, b in moved)  # only onto the new worker
    assert 0.12 < len(moved) / len(keys) < 0.28, len(moved)  # ~1/5
    back = [policy(four, tokens=k).worker_id for k in keys]  # it leaves again
    assert back == before


# ---- through the pool, and the settings -----------------------------------------------
def _join(pool: WorkerPool, wid: str, role: int) -> None:
    pool.apply("JOINED", rpb.WorkerInfo(worker_id=wid, role=role, address=f"{wid}:1",
                                        model_id="m"))


def test_pool_passes_tokens_and_reports_the_detail():
    pool = WorkerPool(mode="pd", prefill_policy="cache_aware", decode_policy="round_robin",
                      config=GatewayConfig(cache_threshold=0.5))
    assert pool.prefill_policy.cache_threshold == 0.5
    for wid in ("p0", "p1"):
        _join(pool, wid, rpb.WORKER_ROLE_PREFILL)
    _join(pool, "d0", rpb.WORKER_ROLE_DECODE)
    routes = [pool.route(tokens=prompt(i)) for i in range(4)]
    assert len({r.prefill.worker_id for r in routes}) == 1
    detail = dict(routes[-1].detail)
    assert detail["prefill.balance_override"] is False
    assert detail["prefill.match_rate"] == round(RATE, 4) and "decode.match_rate" not in detail
    assert f"match_rate {round(RATE, 4)}" in routes[-1].why
    assert "prefill cache_aware of 2" in routes[-1].why
    for r in routes:
        pool.release(r)
    assert pool.has_route()  # no tokens: still routes
    home = routes[0].prefill.worker_id
    pool.apply("LEFT", rpb.WorkerInfo(worker_id=home, role=rpb.WORKER_ROLE_PREFILL,
                                      address=f"{home}:1", model_id="m"))
    assert home not in pool.prefill_policy.trees  # its tree went with it
    assert pool.route(tokens=prompt(9)).prefill.worker_id != home


def test_colocated_prefix_hash_through_the_pool():
    pool = WorkerPool(mode="colocated", decode_policy="prefix_hash",
                      config=GatewayConfig(prefix_token_count=128))
    for i in range(3):
        _join(pool, f"c{i}", rpb.WORKER_ROLE_COLOCATED)
    routes = [pool.route(tokens=prompt(i)) for i in range(10)]  # 128 first: all shared
    assert len({r.decode.worker_id for r in routes}) == 1
    assert dict(routes[0].detail)["decode.prefix_hash"] == \
        dict(routes[-1].detail)["decode.prefix_hash"]


def test_settings_from_env_and_flags():
    cfg = gateway_config_from_env(env={
        "PDMESH_PREFILL_POLICY": "cache_aware", "PDMESH_DECODE_POLICY": "prefix_hash",
        "PDMESH_GATEWAY_CACHE_THRESHOLD": "0.6", "PDMESH_GATEWAY_BALANCE_ABS_THRESHOLD": "8",
        "PDMESH_GATEWAY_BALANCE_REL_THRESHOLD": "2", "PDMESH_GATEWAY_MAX_TREE_SIZE": "4096",
        "PDMESH_GATEWAY_PREFIX_TOKEN_COUNT": "64"})
    assert (cfg.prefill_policy, cfg.decode_policy, cfg.cache_threshold,
            cfg.balance_abs_threshold, cfg.balance_rel_threshold, cfg.max_tree_size,
            cfg.prefix_token_count) == ("cache_aware", "prefix_hash", 0.6, 8, 2.0, 4096, 64)
    d = GatewayConfig()
    assert (d.cache_threshold, d.balance_abs_threshold, d.balance_rel_threshold,
            d.max_tree_size, d.prefix_token_count) == (0.3, 64, 1.5, 1 << 26, 256)
    for bad in ({"cache_threshold": 1.5}, {"max_tree_size": 0}, {"prefix_token_count": 0},
                {"balance_rel_threshold": 0}):
        with pytest.raises(ValueError):
            GatewayConfig(**bad)
    policy = make_policy("prefix_hash", cfg)
    assert policy.prefix_token_count == 64
    ca = make_policy("cache_aware", cfg)
    assert (ca.cache_threshold, ca.balance_abs, ca.balance_rel, ca.max_tree_size) == \
        (0.6, 8, 2.0, 4096)

    p = argparse.ArgumentParser()
    gateway_cmd.add_arguments(p)
    args = p.parse_args(["--prefill-policy", "cache_aware", "--cache-threshold", "0.4",
                         "--max-tree-size", "100", "--prefix-token-count", "32"])
    cfg = gateway_cmd.config_from_args(args)
    assert (cfg.prefill_policy, cfg.cache_threshold, cfg.max_tree_size,
            cfg.prefix_token_count) == ("cache_aware", 0.4, 100, 32)
    s = argparse.ArgumentParser()
    serve_cmd.add_arguments(s)
    sargs = s.parse_args(["--prefill-policy", "cache_aware", "--balance-abs-threshold", "3"])
    assert sargs.gateway_arg == ["--prefill-policy=cache_aware", "--balance-abs-threshold=3"]


def test_route_span_carries_the_match_rate_and_balance_override(monkeypatch):
    """observe.RequestObserver.routed: the route's detail becomes span attributes."""
    from types import SimpleNamespace

    from pdmesh.services.gateway import observe

    made = []
    monkeypatch.setattr(observe.tracing, "enabled", lambda: True)
    monkeypatch.setattr(observe.tracing, "start_span", lambda name, attrs, **kw: made.append(
        (name, attrs)) or SimpleNamespace(end=lambda *_: None))
    pool = WorkerPool(mode="pd", prefill_policy="cache_aware")
    for wid, role in (("p0", rpb.WORKER_ROLE_PREFILL), ("p1", rpb.WORKER_ROLE_PREFILL),
                      ("d0", rpb.WORKER_ROLE_DECODE)):
        _join(pool, wid, role)
    pool.route(tokens=prompt(0))
    route = pool.route(tokens=prompt(1))
    me = SimpleNamespace(span=SimpleNamespace(set_attributes=lambda a: None), context=None)
    observe.RequestObserver.routed(me, route, 7, "pd", route.why)
    (name, attrs), = made
    assert name == "route"
    assert attrs["pdmesh.route.prefill.match_rate"] == round(RATE, 4)
    assert attrs["pdmesh.route.prefill.balance_override"] is False
    assert attrs["pdmesh.route.prefill.choice"] == "cache"
