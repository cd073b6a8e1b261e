"""cache_cost routing (services/gateway/cache_cost.py): least estimated prefill work,
uncached prompt tokens + tokens queued. The policy alone (a shared system prompt over
two prefills under concurrency, a long history sticking to its worker, a queue beating a
match), and through a WorkerPool (charges taken at routing, settled at the first token or
the end, the detail pd_mode reads)."""
from __future__ import annotations

from pdmesh.config import GatewayConfig, ROUTING_POLICIES
from pdmesh.services.gateway.cache_cost import CacheCostPolicy
from pdmesh.services.gateway.pool import WorkerPool
from pdmesh.services.gateway.routing import CacheAwarePolicy, Load, Worker, make_policy
from pdmesh.v1 import registry_pb2 as rpb

SYSTEM = list(range(10_000, 11_024))  # a 1,024-token shared system prompt


def workers(n: int) -> list[Worker]:
    return [Worker(f"w{i}", "PREFILL", f"10.0.0.{i}:1", "m") for i in range(n)]


def turn(conv: int, k: int) -> list[int]:
    """Conversation `conv`'s prompt at turn k: the system prompt, then k 64-token turns."""
    return SYSTEM + [t for j in range(k) for t in [conv * 100 + j] * 64]


def route_all(policy, ws: list[Worker], prompts: list[list[int]]) -> list[Worker]:
    """Route each prompt while the earlier ones are still queued (charges never settle):
    what the pool does for requests that arrive together."""
    picks = []
    for p in prompts:
        w = policy(ws, tokens=p)
        w.pending_prefill_tokens += policy.last_detail["uncached_tokens"]
        picks.append(w)
    return picks


def test_shared_system_prompt_spreads_over_both_prefills():
    ws = workers(2)
    picks = route_all(CacheCostPolicy(), ws, [turn(c, 1) for c in range(32)])
    counts = [sum(p is w for p in picks) for w in ws]
    assert min(counts) >= 14, counts  # both used, about evenly
    # each computed the system prompt once: from then on both match it
    policy = CacheCostPolicy()
    route_all(policy, workers(2), [turn(c, 1) for c in range(4)])
    assert len(policy.trees) == 2 and all(t.match([tuple(SYSTEM[i:i + 16]) for i in range(0, 1024, 16)]) == 1024
               for t in policy.trees.values())


def test_smg_cache_aware_piles_the_same_load_onto_one_prefill():
    """What cache_cost fixes: cache_aware's imbalance rule never fires at <= 64 in flight."""
    ws, policy = workers(2), CacheAwarePolicy()
    picks = []
    for c in range(32):
        w = policy(ws, tokens=turn(c, 1))
        w.inflight += 1
        picks.append(w.worker_id)
    assert len(set(picks)) == 1


def test_long_history_sticks_to_its_worker_when_queues_are_equal():
    ws, policy = workers(2), CacheCostPolicy()
    home = policy(ws, tokens=turn(7, 1))  # conversation 7's first turn: w0 (both empty)
    policy(ws, tokens=turn(8, 1))  # the other worker caches the system prompt too
    for k in range(2, 12):  # a history growing to 1,024 + 704 tokens
        for w in ws:
            w.pending_prefill_tokens = 500  # equal queues
        assert policy(ws, tokens=turn(7, k)) is home
        assert policy.last_detail["choice"] == "cache"
        assert policy.last_detail["uncached_tokens"] == 64
        assert policy.last_detail["queued_tokens"] == 500


def test_a_long_queue_outweighs_a_match():
    ws, policy = workers(2), CacheCostPolicy()
    home = policy(ws, tokens=turn(1, 1))
    other = next(w for w in ws if w is not home)
    home.pending_prefill_tokens = 900  # 64 uncached + 900 queued < 1,152 + 0
    assert policy(ws, tokens=turn(1, 2)) is home
    home.pending_prefill_tokens = 1200  # 64 + 1,200 > 1,152: recomputing is sooner
    assert policy(ws, tokens=turn(1, 3)) is other
    assert policy.last_detail == {"match_rate": 0.0, "uncached_tokens": 1216,
                                  "queued_tokens": 0, "choice": "load"}
    # the worker's own report counts when it says more than our charges
    home.pending_prefill_tokens, other.load = 0, Load(queued_prefill_tokens=5000)
    assert policy(ws, tokens=turn(1, 4)) is home


def test_without_tokens_the_shortest_queue_and_nothing_stored():
    ws, policy = workers(2), CacheCostPolicy()
    ws[0].pending_prefill_tokens = 10
    assert policy(ws) is ws[1] and policy(ws, tokens=[]) is ws[1]
    assert all(t.size == 0 for t in policy.trees.values())
    assert policy.last_detail["choice"] == "no_match"


def test_tree_bounded_forgotten_and_built_by_name():
    assert "cache_cost" in ROUTING_POLICIES
    policy = make_policy("cache_cost", GatewayConfig(prefill_policy="cache_cost",
                                                     max_tree_size=500))
    assert isinstance(policy, CacheCostPolicy) and policy.max_tree_size == 500
    ws = workers(2)
    for i in range(40):
        policy(ws, tokens=[i] * 300)
    assert all(t.size <= 500 for t in policy.trees.values())
    policy.forget("w0")
    assert set(policy.trees) == {"w1"}


# ---- through the pool -----------------------------------------------------------------
def _join(pool: WorkerPool, wid: str, role: int) -> None:
    pool.apply("JOINED", rpb.WorkerInfo(worker_id=wid, role=role, address=f"{wid}:1",
                                        model_id="m"))


def _pd_pool(prefill_policy: str = "cache_cost") -> WorkerPool:
    pool = WorkerPool(mode="pd", prefill_policy=prefill_policy)
    for wid in ("p0", "p1"):
        _join(pool, wid, rpb.WORKER_ROLE_PREFILL)
    _join(pool, "d0", rpb.WORKER_ROLE_DECODE)
    return pool


def pending(pool: WorkerPool) -> dict[str, int]:
    return {w.worker_id: w.pending_prefill_tokens for w in pool.workers("PREFILL")}


def test_pool_charges_uncached_tokens_and_settles_once():
    pool = _pd_pool()
    routes = [pool.route(tokens=turn(c, 1)) for c in range(32)]  # all in flight at once
    per = {wid: sum(r.prefill.worker_id == wid for r in routes) for wid in ("p0", "p1")}
    assert min(per.values()) >= 14, per
    detail = dict(routes[-1].detail)
    assert detail["prefill.uncached_tokens"] == 64 and "prefill.match_rate" in detail
    assert "prefill cache_cost of 2" in routes[-1].why
    # each worker: the system prompt once plus 64 tokens per other conversation
    assert sum(pending(pool).values()) == sum(r.charge.tokens for r in routes)
    assert sorted(r.charge.tokens for r in routes)[-2:] == [1088, 1088]
    for r in routes[:16]:
        pool.prefilled(r)  # first token: no longer queued ...
        pool.release(r)  # ... and the end settles nothing twice
    for r in routes[16:]:
        pool.release(r)  # ended before a first token (failed, cancelled)
    assert pending(pool) == {"p0": 0, "p1": 0}
    assert all(w.inflight == 0 for w in pool.workers())


def test_pool_charges_whole_prompts_for_other_policies_and_keeps_them_on_rejoin():
    pool = _pd_pool("round_robin")
    r = pool.route(tokens=turn(0, 2))
    assert r.charge.tokens == 1024 + 128 and sum(pending(pool).values()) == 1152
    _join(pool, r.prefill.worker_id, rpb.WORKER_ROLE_PREFILL)  # a resync re-joins it
    assert sum(pending(pool).values()) == 1152
    pool.release(r)
    assert sum(pending(pool).values()) == 0
    assert pool.has_route() and sum(pending(pool).values()) == 0  # no tokens: no charge


# ---- through a real gateway process (fake workers) -------------------------------------
LIBRARY = ("You are the help desk of a small public library. Answer briefly. The library "
           "opens at nine and closes at five on weekdays and is closed on Sundays; members "
           "may borrow up to ten books for three weeks and renew them twice online.")


def test_a_first_token_settles_the_charge_in_a_gateway():
    """`pdmesh gateway --prefill-policy cache_cost` over two fake prefills: while request
    A still streams (after its first token), B and C sharing A's system prompt go to A's
    prefill. Were A's prompt still counted as queued there until A's end, B would go to
    the other prefill (its tail + A's prompt > its whole prompt)."""
    import openai

    from gateway_fakes import SLOW, FakeMesh, start_worker, stop_workers
    from test_gateway_retries import spawn, wait_routable

    reg, m, _ = spawn(["registry", "--host", "127.0.0.1", "--port", "0",
                       "--heartbeat-interval", "0.3"], r"listening on (\S+)")
    registry = m.group(1)
    gw, m, lines = spawn(["gateway", "--registry", registry, "--host", "127.0.0.1", "--port",
                          "0", "--grpc-port", "0", "--prefill-policy", "cache_cost"],
                         r"listening on (\S+) \(REST\)")
    mesh = FakeMesh(list(range(1000, 1016)))
    roles = (rpb.WORKER_ROLE_PREFILL, rpb.WORKER_ROLE_PREFILL, rpb.WORKER_ROLE_DECODE)
    mesh.workers = [start_worker(mesh, role, registry) for role in roles]
    prefills = [server.fake for server, _ in mesh.workers[:2]]
    try:
        oai = openai.OpenAI(base_url=f"http://{m.group(1)}/v1", api_key="x", max_retries=0)
        wait_routable(oai)
        before = [p.calls for p in prefills]

        def ask(q: str, max_tokens: int = 2, **kw):
            return oai.chat.completions.create(
                model="default", max_tokens=max_tokens, messages=[
                    {"role": "system", "content": LIBRARY}, {"role": "user", "content": q}],
                **kw)
        a = ask("Are you open on Saturday?", stream=True, seed=SLOW, max_tokens=16)
        next(c for c in a if c.choices and c.choices[0].delta.content)  # A's first token
        ask("Can I renew a book online?")
        ask("How many books can I borrow?")
        assert sum(1 for _ in a) > 5  # A was still streaming meanwhile
        served = sorted(p.calls - b for p, b in zip(prefills, before))
        assert served == [0, 3], "".join(lines[-20:])
    finally:
        stop_workers(mesh)
        for p in (gw, reg):
            p.terminate()
            assert p.wait(10) == 0
