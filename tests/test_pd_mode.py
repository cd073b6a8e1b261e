"""Per-request disaggregation, one layer at a time (plain Python, no grpc, no workers):
the cost model (services/gateway/pd_cost.py), the decider's choices, queues and
calibration (pd_mode.py), and the WorkerPool routing with it. End to end through
`pdmesh serve`: tests/test_pd_mode_serve.py."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from pdmesh.config import GatewayConfig, gateway_config_from_env
from pdmesh.services.gateway.pd_cost import CostModel, Situation
from pdmesh.services.gateway.pd_metrics import PdModeMetrics
from pdmesh.services.gateway.pd_mode import LOCAL, REMOTE, PdModeDecider
from pdmesh.services.gateway.pool import WorkerPool
from pdmesh.services.gateway.routing import Load, Worker
from pdmesh.sim.profile import Profile
from pdmesh.v1 import registry_pb2 as rpb

# 1 ms/token prefill plus 10 ms, 10 + 2·batch ms decode steps, 1 MB/token over 1 GB/s
# (1 ms/token of transfer), 5 ms overhead each way
PROFILE = Profile(prefill_a=0.01, prefill_b=1e-3, decode_a=0.01, decode_b=2e-3,
                  kv_bytes_per_token=1e6, transfer_bandwidth=1e9, client_overhead=0.005)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def pair(running: int = 0, queued_prefill_tokens: int = 0):
    p = Worker("p0", "PREFILL", "10.0.0.1:1", "m",
               Load(queued_prefill_tokens=queued_prefill_tokens))
    d = Worker("d0", "DECODE", "10.0.0.2:1", "m", Load(running=running))
    return p, d


def decider(policy="auto", stall_weight=0.1, max_stall=0.25, **kw):
    return PdModeDecider(policy, CostModel(PROFILE, stall_weight), max_stall, **kw)


def situation(n, running=0, prefill_wait=0.0, local_wait=0.0, cached_remote=0, cached_local=0,
              decode_reuse=True):
    return Situation(n, n - cached_remote, n - cached_local, prefill_wait, local_wait,
                     running, 0.0, n - cached_local if decode_reuse else n)


# -- the cost model ----------------------------------------------------------------------
def test_estimate_idle_pair_local_saves_the_transfer():
    e = CostModel(PROFILE).estimate(situation(100))
    # prefill 10 + 100 ms; remote adds 100 ms of transfer; same overhead both ways
    assert e.ttft_local == pytest.approx(0.005 + 0.11)
    assert e.ttft_remote == pytest.approx(0.005 + 0.11 + 0.1)
    assert e.stall_s == pytest.approx(0.11) and e.cost_local == pytest.approx(e.ttft_local)


def test_estimate_counts_queues_running_streams_and_cache():
    m = CostModel(PROFILE, stall_weight=0.5)
    e = m.estimate(situation(100, running=4, prefill_wait=1.0, local_wait=0.2,
                             cached_remote=80, cached_local=0))
    half_step = (0.01 + 2e-3 * 4) / 2
    # remote: P's queue + 20 uncached tokens + the whole prompt's transfer
    assert e.ttft_remote == pytest.approx(0.005 + 1.0 + 0.03 + 0.1 + half_step)
    assert e.ttft_local == pytest.approx(0.005 + 0.2 + half_step + 0.11)
    # every one of the 4 running streams waits out the local prefill
    assert e.cost_local == pytest.approx(e.ttft_local + 0.5 * 4 * 0.11)
    # a decode still busy with local prefills delays adopting the remote KV too
    late = m.estimate(situation(10, local_wait=2.0))
    assert late.ttft_remote == pytest.approx(0.005 + 2.0)


def test_online_calibration_moves_the_model_toward_measurements():
    m = CostModel(PROFILE)
    for n, ratio in ((20, 0.2), (100, 0.2), (400, 0.2), (900, 5.0)):
        m.observe_prefill(n, ratio * PROFILE.prefill_time(n))  # 5x faster, one slow step
    # the median ratio: one outlier (a busy host's slow step) does not move it much
    assert m.prefill_scale == pytest.approx(0.2)
    assert m.prefill_time(300) == pytest.approx(0.2 * PROFILE.prefill_time(300))
    assert m.snapshot()["prefill_b"] == pytest.approx(0.2 * 1e-3)
    m.observe_prefill(0, 1.0)  # nothing computed (all cached): no sample
    m.observe_prefill(10, float("nan"))
    assert m.prefill_scale == pytest.approx(0.2)
    m.observe_transfer(4e9, 2.0)
    assert m.bandwidth == pytest.approx(2e9)
    for _ in range(50):
        m.observe_overhead(LOCAL, 0.04)
    assert m.overhead[LOCAL] == pytest.approx(0.04, abs=1e-4)
    assert m.overhead[REMOTE] == 0.005  # untouched
    m.observe_overhead(REMOTE, -5.0)  # never below 0
    assert m.overhead[REMOTE] == 0.0


# -- the decisions -----------------------------------------------------------------------
def test_auto_short_prompts_local_long_ones_remote():
    d = decider()
    p, dw = pair()
    short = d.choose(p, dw, list(range(40)))
    assert short.mode == LOCAL and short.estimate.ttft_local < short.estimate.ttft_remote
    short.ended()
    # 600 tokens stall the decode 0.61 s > 0.25 s: remote, although local is faster idle
    long = d.choose(p, dw, list(range(600)))
    assert long.mode == REMOTE and long.estimate.ttft_local < long.estimate.ttft_remote
    assert long.predicted_s == long.estimate.ttft_remote


def test_auto_busy_decode_sends_even_short_prompts_remote():
    d = decider(stall_weight=0.5)
    p, dw = pair(running=32)  # 32 streams x 0.05 s stall x 0.5 > the 40 ms transfer
    assert d.choose(p, dw, list(range(40))).mode == REMOTE


def test_auto_busy_prefill_sends_medium_prompts_local():
    d = decider(max_stall=1.0, clock=Clock())
    p, dw = pair()
    first = d.choose(p, dw, list(range(900)))  # a 0.91 s stall is allowed here
    assert first.mode == LOCAL  # idle pair: local saves the transfer
    first.ended()
    d = decider(max_stall=0.5, clock=Clock())
    big = d.choose(p, dw, list(range(900)))
    assert big.mode == REMOTE  # P now busy ~0.9 s
    medium = d.choose(p, dw, list(range(300)))
    assert medium.situation.prefill_wait_s == pytest.approx(0.91)
    assert medium.mode == LOCAL  # waiting for P costs more than stalling an idle decode


def test_reported_prefill_queue_counts_too():
    d = decider()
    p, dw = pair(queued_prefill_tokens=2000)  # other gateways' prompts: ~2 s there
    t = d.choose(p, dw, list(range(200)))
    assert t.situation.prefill_wait_s == pytest.approx(2.01) and t.mode == LOCAL


@pytest.mark.parametrize("policy,mode", [("always", REMOTE), ("never", LOCAL)])
def test_fixed_policies_ignore_the_model(policy, mode):
    d = decider(policy)
    p, dw = pair(running=100)
    for n in (5, 5000):
        t = d.choose(p, dw, list(range(n)))
        assert t.mode == mode and t.policy == policy
        assert t.estimate.ttft_remote > 0 and t.estimate.ttft_local > 0  # still predicted


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="pd_mode must be one of"):
        PdModeDecider("sometimes")
    with pytest.raises(ValueError, match="pd_mode must be one of"):
        GatewayConfig(pd_mode="sometimes")
    with pytest.raises(ValueError, match="pd_mode_max_stall_s"):
        GatewayConfig(pd_mode_max_stall_s=-1)
    cfg = gateway_config_from_env(env={"PDMESH_GATEWAY_PD_MODE": "auto",
                                       "PDMESH_GATEWAY_PD_MODE_STALL_WEIGHT": "0.3"})
    assert cfg.pd_mode == "auto" and cfg.pd_mode_stall_weight == 0.3
    assert GatewayConfig().pd_mode == "always"  # today's behaviour by default


def test_profile_file_sets_the_starting_coefficients(tmp_path):
    path = tmp_path / "profile.json"
    PROFILE.replace(prefill_b=7e-3).save(path)
    d = PdModeDecider.from_config(GatewayConfig(pd_mode="auto", pd_mode_profile=str(path)))
    assert d.model.prefill_time(10) == pytest.approx(0.01 + 0.07) and d.policy == "auto"
    (tmp_path / "bad.json").write_text(json.dumps({"prefill_q": 1}))
    with pytest.raises(ValueError, match="unknown profile fields: prefill_q"):
        PdModeDecider.from_config(GatewayConfig(pd_mode_profile=str(tmp_path / "bad.json")))


# -- queues, feedback, metrics -----------------------------------------------------------
def test_queue_grows_with_choices_and_resets_when_empty():
    clock = Clock()
    d = decider("always", clock=clock)
    p, dw = pair()
    a = d.choose(p, dw, list(range(100)))
    b = d.choose(p, dw, list(range(100)))
    assert a.situation.prefill_wait_s == 0 and b.situation.prefill_wait_s == pytest.approx(0.11)
    clock.t += 0.5  # a's first token came 0.29 s later than predicted
    a.first_token()
    c = d.choose(p, dw, list(range(10)))
    # b (0.11 s) now ends 0.29 s later: at 100.22 + 0.29 + ..., measured from 100.5
    assert c.situation.prefill_wait_s == pytest.approx(0.22 + (0.5 - a.predicted_s) - 0.5)
    b.ended(), c.ended(), a.ended()  # ended after first_token: counted once
    assert d.choose(p, dw, [1]).situation.prefill_wait_s == 0


def test_first_token_and_prefill_timings_feed_metrics_and_model():
    clock, reg = Clock(), CollectorRegistry()
    d = decider("auto", clock=clock, metrics=PdModeMetrics(reg))
    d.metrics.watch(d)  # the coefficients, read at scrape time
    p, dw = pair()
    local = d.choose(p, dw, list(range(20)))
    clock.t += 0.2
    local.first_token()
    local.first_token()  # a retry's or a second chunk's call changes nothing
    assert local.measured_s == pytest.approx(0.2)
    assert d.model.overhead[LOCAL] > 0.005  # measured 0.2 s vs 0.035 s modelled

    def sample(name, **labels):
        return reg.get_sample_value(name, labels)
    assert sample("pdmesh_gateway_pd_mode_requests_total", pd_mode="local") == 1
    assert sample("pdmesh_gateway_pd_mode_ttft_seconds_sum", pd_mode="local",
                  source="measured") == pytest.approx(0.2)
    assert sample("pdmesh_gateway_pd_mode_ttft_seconds_sum", pd_mode="local",
                  source="predicted") == pytest.approx(local.predicted_s)
    assert sample("pdmesh_gateway_pd_mode_ttft_error_seconds_count", pd_mode="local") == 1
    assert sample("pdmesh_gateway_pd_mode_model", coefficient="overhead_local") \
        == d.model.overhead[LOCAL]
    assert sample("pdmesh_gateway_pd_mode_model", coefficient="prefill_scale") == 1.0
    remote = decider("always", clock=clock)
    t = remote.choose(p, dw, list(range(400)))
    t.prefill_done(SimpleNamespace(cached_tokens=0, timings=SimpleNamespace(
        queue_s=0.0, prefill_s=0.2, transfer_s=0.05, wait_transfer_s=0.0)))
    # 0.2 s for 400 tokens: faster than the profile's 0.41 s
    assert remote.model.prefill_scale == pytest.approx(0.2 / 0.41)
    assert remote.model.bandwidth == pytest.approx(400 * 1e6 / 0.05)
    clock.t += 0.3
    t.first_token()  # both in: the remote overhead moves toward 0.3 - 0.25
    assert remote.model.overhead[REMOTE] == pytest.approx(0.005 + 0.2 * (0.05 - 0.005))
    attrs = t.attributes()
    assert attrs["pd_mode"] == "remote" and attrs["pd_mode.policy"] == "always"
    assert attrs["pd_mode.predicted_ttft_s"] == pytest.approx(t.predicted_s, abs=1e-6)


def test_corrections_are_not_applied_twice():
    """Three prompts queued on the prefill, each really taking half its predicted time:
    once two have their first token, the third's queue end is right, not over-shifted."""
    clock = Clock()
    d = decider("always", clock=clock)
    p, dw = pair()
    ts = [d.choose(p, dw, list(range(190))) for _ in range(3)]  # 0.2 s predicted each
    for i, t in enumerate(ts[:2]):
        clock.t = 100.0 + 0.1 * (i + 1) + (ts[0].predicted_s - 0.2)  # ends after 0.1 s
        t.first_token()
    late = d.choose(p, dw, [1])
    # the third prefill started at 100.2 s and takes 0.2 s: free at 100.4 s
    assert late.situation.prefill_wait_s == pytest.approx(100.4 - clock.t)


def test_prefill_response_cached_tokens_calibrate_what_was_computed():
    d = decider("always")
    p, dw = pair()
    t = d.choose(p, dw, list(range(1000)))  # not cache-aware: the whole prompt predicted
    t.prefill_done(SimpleNamespace(cached_tokens=900, timings=SimpleNamespace(
        queue_s=0.0, prefill_s=0.11, transfer_s=0.0, wait_transfer_s=0.0)))
    # 100 tokens computed in 0.11 s: the profile's 1 ms/token stands (not 0.1 ms)
    assert d.model.prefill_scale == pytest.approx(1.0)


def test_only_prefills_that_ran_alone_calibrate_the_prefill_time():
    d = decider("always")
    p, dw = pair()
    first, second = (d.choose(p, dw, list(range(50))) for _ in range(2))
    # the second joined a busy queue: its prefill step may have held the first's tokens
    second.prefill_done(SimpleNamespace(cached_tokens=0, timings=SimpleNamespace(
        queue_s=0.0, prefill_s=0.5, transfer_s=0.01, wait_transfer_s=0.0)))
    assert d.model.prefill_scale == 1.0
    first.prefill_done(SimpleNamespace(cached_tokens=0, timings=SimpleNamespace(
        queue_s=0.0, prefill_s=0.11, transfer_s=0.01, wait_transfer_s=0.0)))
    assert d.model.prefill_scale == pytest.approx(0.11 / 0.06)  # the profile says 60 ms


def test_cache_aware_detail_counts_cached_prefixes_on_both_sides():
    d = decider("never")
    p, dw = pair()
    prompt = list(range(320))
    first = d.choose(p, dw, prompt, [("prefill.match_rate", 0.0)])
    assert first.situation.uncached_local == 320
    again = d.choose(p, dw, prompt, [("prefill.match_rate", 0.75)])
    # local: all 20 chunks were prefilled on this decode (at least 1 token is computed)
    assert again.situation.uncached_local == 1 and again.situation.uncached_remote == 80
    # a remote prefill's prompt is in the decode's cache too (decode-side reuse), and
    # only the KV the decode lacks is sent
    d2 = decider("always")
    d2.choose(p, dw, prompt, [("prefill.match_rate", 0.0)]).ended()
    turn2 = d2.choose(p, dw, prompt + list(range(500, 532)), [("prefill.match_rate", 0.9)])
    assert turn2.situation.uncached_local == 32
    assert turn2.estimate.ttft_remote == pytest.approx(
        0.005 + d2.model.prefill_time(turn2.situation.uncached_remote) + 0.032)
    plain = d.choose(p, dw, prompt)  # no cache-aware policy: the whole prompt
    assert plain.situation.uncached_local == plain.situation.uncached_remote == 320
    d.forget("d0")
    assert d.choose(p, dw, prompt, [("prefill.match_rate", 0.0)]).situation.uncached_local == 320


def test_estimate_sends_the_whole_prompt_without_decode_side_reuse():
    """A decode that does not reuse adopted KV (--no-decode-prefix-cache) gets every
    page of a remote prefill: its cached prefix saves its local prefill only."""
    m = CostModel(PROFILE)
    reuse = m.estimate(situation(300, cached_remote=280, cached_local=256))
    whole = m.estimate(situation(300, cached_remote=280, cached_local=256, decode_reuse=False))
    assert reuse.ttft_remote == pytest.approx(0.005 + 0.03 + 0.044)  # 44 tokens sent
    assert whole.ttft_remote == pytest.approx(0.005 + 0.03 + 0.300)  # all 300
    assert whole.ttft_local == reuse.ttft_local == pytest.approx(0.005 + 0.054)


def reuse_pair(prefix_cache=True, adopted=True):
    p, d = pair()
    d.prefix_cache, d.reuses_adopted_kv = prefix_cache, adopted
    return p, d


@pytest.mark.parametrize("adopted", [True, False])
def test_decider_follows_the_decodes_announced_reuse(adopted):
    """Turn 2 of a conversation whose turn 1 was prefilled remotely: with decode-side
    reuse the decode has turn 1's KV (32 tokens to send); without it the decode cached
    nothing of it and a remote prefill sends all 352 tokens, which the model, the
    calibration and the choice all see."""
    d = decider("always")
    p, dw = reuse_pair(adopted=adopted)
    prompt = list(range(320))
    d.choose(p, dw, prompt, [("prefill.match_rate", 0.0)]).ended()
    turn2 = d.choose(p, dw, prompt + list(range(500, 532)), [("prefill.match_rate", 0.9)])
    s = turn2.situation
    assert (s.uncached_local, s.transfer_tokens) == ((32, 32) if adopted else (352, 352))
    assert turn2.estimate.ttft_remote == pytest.approx(
        0.005 + d.model.prefill_time(s.uncached_remote) + s.transfer_tokens * 1e-3)
    # the write time calibrates the bandwidth against the bytes really sent
    turn2.prefill_done(SimpleNamespace(cached_tokens=0, timings=SimpleNamespace(
        queue_s=0.0, prefill_s=0.05, transfer_s=0.352, wait_transfer_s=0.0)))
    assert d.model.bandwidth == pytest.approx(352e6 / 0.352 if not adopted else 32e6 / 0.352)


def test_a_decode_without_a_prefix_cache_reuses_nothing_local():
    d = decider("never")
    p, dw = reuse_pair(prefix_cache=False, adopted=False)
    prompt = list(range(320))
    d.choose(p, dw, prompt, [("prefill.match_rate", 0.0)]).ended()
    again = d.choose(p, dw, prompt, [("prefill.match_rate", 0.0)])
    assert again.situation.uncached_local == again.situation.transfer_tokens == 320
    # with its prefix cache (decode-side reuse off), its own local prefills are reused
    p, dw = reuse_pair(prefix_cache=True, adopted=False)
    d.choose(p, dw, prompt, [("prefill.match_rate", 0.0)]).ended()
    again = d.choose(p, dw, prompt, [("prefill.match_rate", 0.0)])
    assert again.situation.uncached_local == 1 and again.situation.transfer_tokens == 320


# -- the pool routing with it ------------------------------------------------------------
def info(wid, role, running=0):
    return rpb.WorkerInfo(worker_id=wid, role=role, address=f"{wid}:1", model_id="m",
                          kv_layout=rpb.KvLayout(page_size=16, bytes_per_page=16 * 46080),
                          load=rpb.LoadReport(running=running))


def test_pool_routes_local_without_a_prefill_and_releases_the_ticket():
    pool = WorkerPool(mode="auto", pd_mode=decider())
    pool.apply("JOINED", info("p0", rpb.WORKER_ROLE_PREFILL))
    pool.apply("JOINED", info("d0", rpb.WORKER_ROLE_DECODE))
    short = pool.route(tokens=list(range(30)))
    assert short.prefill is None and short.decode.worker_id == "d0"
    assert short.ticket.mode == LOCAL and short.ticket.situation.kv_bytes_per_token == 46080
    assert "local prefill" in short.why
    long = pool.route(tokens=list(range(2000)))
    assert long.prefill.worker_id == "p0" and long.ticket.mode == REMOTE
    assert {w.worker_id: w.inflight for w in pool.workers()} == {"p0": 1, "d0": 2}
    # the short one is still prefilling: no stream of the decode's to stall yet
    assert long.ticket.situation.decode_running == 0
    short.ticket.first_token()  # now it decodes
    again = pool.route(tokens=list(range(2000)))
    assert again.ticket.situation.decode_running == 1  # long is still prefilling
    pool.release(again)
    pool.release(short), pool.release(long)
    assert not short.ticket.open and not long.ticket.open
    assert {w.inflight for w in pool.workers()} == {0}
    assert pool.has_route()  # a probe without tokens: no decision, no ticket


def test_pool_reads_the_decodes_kv_reuse_from_its_registry_entry():
    pool = WorkerPool(mode="auto", pd_mode=decider("always"))
    pool.apply("JOINED", info("p0", rpb.WORKER_ROLE_PREFILL))
    off = info("d0", rpb.WORKER_ROLE_DECODE)
    off.kv_reuse.CopyFrom(rpb.KvReuse(prefix_cache=True, adopted_kv=False))
    pool.apply("JOINED", off)
    old = info("d1", rpb.WORKER_ROLE_DECODE)  # a worker older than KvReuse: unset
    assert not old.HasField("kv_reuse")
    pool.apply("JOINED", old)
    seen = {w.worker_id: (w.prefix_cache, w.reuses_adopted_kv) for w in pool.workers()}
    assert seen["d0"] == (True, False) and seen["d1"] == (True, True)


def test_pool_without_a_decider_or_pair_has_no_ticket():
    pool = WorkerPool(mode="auto")
    pool.apply("JOINED", info("p0", rpb.WORKER_ROLE_PREFILL))
    pool.apply("JOINED", info("d0", rpb.WORKER_ROLE_DECODE))
    r = pool.route(tokens=[1, 2, 3])
    assert r.prefill is not None and r.ticket is None
    colo = WorkerPool(mode="auto", pd_mode=decider("never"))
    colo.apply("JOINED", info("c0", rpb.WORKER_ROLE_COLOCATED))
    r = colo.route(tokens=[1, 2, 3])
    assert r.prefill is None and r.ticket is None  # a colocated worker: nothing to choose
