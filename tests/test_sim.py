"""The discrete-event simulator (pdmesh/sim): cases with answers known in closed form."""
from __future__ import annotations

import numpy as np
import pytest

from pdmesh.sim.profile import Profile
from pdmesh.sim.report import simulate_run, to_records
from pdmesh.sim.simulator import Deployment, FixedLoad, RateLoad, Simulator, Workload

BASE = Profile(prefill_a=0.02, prefill_b=1e-4, prefill_c=1e-9, decode_a=0.03, decode_b=2e-3,
               decode_c=1e-6, kv_bytes_per_token=1000.0, transfer_bandwidth=1e6,
               transfer_latency=0.005, max_prefill_tokens=4096, chunked_prefill_size=2048)


def one(profile: Profile, inp: int, out: int, dep: str = "1P1D"):
    (req,) = Simulator(profile, Deployment.parse(dep), Workload(inp, inp, out, out)).run(
        FixedLoad(1, 1))
    return req


@pytest.mark.parametrize("after_step", [False, True])
def test_one_request_ttft_and_latency_exact(after_step):
    p = BASE.replace(first_token_after_step=after_step, client_overhead=0.01)
    req = one(p, 300, 5)
    steps = [p.decode_time(1, 300 + 1 + k) for k in range(4)]  # tokens 2..5
    ttft = 0.01 + p.prefill_time(300) + p.transfer_time(300) + (steps[0] if after_step else 0)
    assert req.ttft == pytest.approx(ttft, abs=1e-12)
    assert req.latency == pytest.approx(0.01 + p.prefill_time(300) + p.transfer_time(300)
                                        + sum(steps), abs=1e-12)
    assert len(req.token_times) == 5


def test_chunked_prefill_takes_one_step_per_chunk():
    # 5000 tokens, chunks of 2048 -> steps of 2048, 2048, 904 tokens
    p = BASE.replace(chunked_prefill_size=2048, max_prefill_tokens=4096)
    req = one(p, 5000, 1)
    prefill = sum(p.prefill_time(n) for n in (2048, 2048, 904))
    assert req.ttft == pytest.approx(prefill + p.transfer_time(5000), abs=1e-12)
    assert req.latency == req.ttft  # one output token: done when it joins the batch


def test_prefill_batches_waiting_prompts_up_to_max_prefill_tokens():
    # 4 prompts of 1000 at once, 2048 tokens per step (the scheduler fills the budget with
    # a chunk of the next prompt): steps of 1000+1000+48, then 952+1000
    p = BASE.replace(max_prefill_tokens=2048, transfer_latency=0.0, kv_bytes_per_token=0.0)
    reqs = Simulator(p, Deployment(1, 1), Workload(1000, 1000, 1, 1)).run(FixedLoad(4, 4))
    first = p.prefill_time(2048)
    second = first + p.prefill_time(1952)
    assert sorted(r.ttft for r in reqs) == pytest.approx([first, first, second, second])


def test_decode_bound_throughput_is_batch_over_step_time():
    # prefill ~free, constant decode step s: each wave of B requests takes (L - 1) steps
    s, batch, length = 0.05, 8, 101
    p = Profile(prefill_a=1e-7, prefill_b=0.0, decode_a=s, decode_b=0.0, decode_c=0.0,
                transfer_latency=0.0, kv_bytes_per_token=0.0)
    run = simulate_run(p, Deployment(1, 1), Workload(64, 64, length, length),
                       FixedLoad(batch, 10 * batch))
    assert run.output_tok_s == pytest.approx(batch * length / ((length - 1) * s), rel=1e-3)
    assert run.tpot.mean == pytest.approx(s, rel=1e-6)


def test_littles_law_under_poisson_load():
    p = BASE.replace(decode_b=0.0, decode_c=0.0)
    rate = 2.0
    reqs = Simulator(p, Deployment(1, 1), Workload(100, 300, 10, 30, seed=3)).run(
        RateLoad(rate, 4000, seed=5))
    lat = np.array([r.latency for r in reqs])
    t0, t1 = 50.0, max(r.t_done for r in reqs) - 50.0
    grid = np.linspace(t0, t1, 4000)
    send = np.array([r.t_send for r in reqs])
    done = np.array([r.t_done for r in reqs])
    in_system = ((send[None, :] <= grid[:, None]) & (grid[:, None] < done[None, :])).sum(1)
    assert in_system.mean() == pytest.approx(rate * lat.mean(), rel=0.1)  # L = lambda W


def test_more_prefill_workers_never_increase_mean_ttft_when_prefill_bound():
    p = BASE.replace(prefill_b=2e-3, decode_a=0.001, decode_b=0.0, decode_c=0.0)
    wl = Workload(500, 800, 8, 16)
    ttfts = [simulate_run(p, Deployment(n, 1), wl, FixedLoad(16, 64)).ttft.mean
             for n in (1, 2, 3, 4)]
    assert all(b <= a + 1e-12 for a, b in zip(ttfts, ttfts[1:])), ttfts
    assert ttfts[-1] < ttfts[0] / 2


def test_decode_kv_capacity_limits_admission():
    # room for exactly two requests of 100 + 20 tokens
    p = BASE.replace(kv_capacity_tokens=240)
    reqs = Simulator(p, Deployment(1, 1), Workload(100, 100, 20, 20)).run(FixedLoad(6, 12))
    events = sorted([(r.t_admit, 1) for r in reqs] + [(r.t_done, -1) for r in reqs],
                    key=lambda e: (e[0], e[1]))
    live = np.cumsum([d for _, d in events])
    assert live.max() == 2


def test_shared_cores_slow_simultaneous_steps():
    # two prefill workers, one core: two prompts at once each take twice as long
    p = BASE.replace(cpu_cores=1.0, prefill_c=0.0, transfer_latency=0.0, kv_bytes_per_token=0.0)
    reqs = Simulator(p, Deployment(2, 1), Workload(500, 500, 1, 1)).run(FixedLoad(2, 2))
    assert [r.ttft for r in reqs] == pytest.approx([2 * p.prefill_time(500)] * 2)
    dedicated = Simulator(p.replace(cpu_cores=0.0), Deployment(2, 1),
                          Workload(500, 500, 1, 1)).run(FixedLoad(2, 2))
    assert [r.ttft for r in dedicated] == pytest.approx([p.prefill_time(500)] * 2)


def test_records_feed_bench_metrics():
    reqs = Simulator(BASE, Deployment(1, 2), Workload(50, 80, 4, 9, seed=1)).run(FixedLoad(3, 9))
    recs = to_records(reqs)
    assert [r.output_tokens for r in recs] == [r.output_len for r in reqs]
    for rec, req in zip(recs, reqs):
        assert len(rec.itl) == req.output_len - 1
        assert rec.ttft + sum(rec.itl) == pytest.approx(rec.e2e)


def test_profile_json_round_trip_and_validation(tmp_path):
    path = tmp_path / "p.json"
    BASE.save(path, extra={"note": "x"})
    assert Profile.load(path) == BASE
    with pytest.raises(ValueError, match="unknown profile fields: bogus"):
        Profile.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="decode_a"):
        Profile(decode_a=-1.0)
    for bad in ("3P", "0P1D", "PD", "1P0D"):
        with pytest.raises(ValueError, match="deployment"):
            Deployment.parse(bad)
    assert str(Deployment.parse("2p1d")) == "2P1D"



class Lengths:
    """A workload with given lengths, in order (duck-types Workload.sample)."""

    def __init__(self, inputs: list[int], outputs: list[int]) -> None:
        self.inputs, self.outputs = inputs, outputs

    def sample(self, n: int):
        return np.array(self.inputs[:n]), np.array(self.outputs[:n])


def test_short_prompt_finishes_while_a_long_one_is_still_chunking():
    # A (5000 tokens) then B (100): step 1 = A's first 2048 + all of B, so B is done after it
    p = BASE.replace(transfer_latency=0.0, kv_bytes_per_token=0.0, max_prefill_tokens=4096)
    a, b = Simulator(p, Deployment(1, 1), Lengths([5000, 100], [1, 1])).run(FixedLoad(2, 2))
    assert b.ttft == pytest.approx(p.prefill_time(2148))
    assert a.ttft == pytest.approx(p.prefill_time(2148) + p.prefill_time(2048)
                                   + p.prefill_time(904))
