"""The simulator's multi-turn workload and prefix-cache model (pdmesh/sim): turn timelines
and cached prefixes in closed form, round robin scattering turns over prefills, and the
`pdmesh simulate --workload multi-turn` command."""
from __future__ import annotations

import json

import pytest

from pdmesh.cli import main
from pdmesh.sim.profile import Profile
from pdmesh.sim.report import simulate_run
from pdmesh.sim.simulator import Deployment, FixedLoad, MultiTurn, RateLoad, Simulator

# no shared cores, no transfer cost: TTFT = client overhead + prefill time of the uncached part
P = Profile(prefill_a=0.01, prefill_b=1e-3, decode_a=0.02, decode_b=0.0, decode_c=0.0,
            transfer_latency=0.0, kv_bytes_per_token=0.0, client_overhead=0.005, page_size=16)
MT = MultiTurn(turns=4, system_len=100, user_min=20, user_max=40, output_min=5, output_max=9,
               think_time=0.5, seed=7)


def run(profile=P, dep="1P1D", mt=MT, load=FixedLoad(1, 1)):
    return Simulator(profile, Deployment.parse(dep), mt).run(load)


def test_one_conversation_history_grows_and_reuses_its_own_prompts():
    reqs = run()
    users, outs = MT.conversation(0)
    assert [r.turn for r in reqs] == [1, 2, 3, 4] and {r.conversation for r in reqs} == {0}
    for k, r in enumerate(reqs, 1):
        assert r.input_len == 100 + sum(users[:k]) + sum(outs[:k - 1])
        assert r.output_len == outs[k - 1]
        cached = 0 if k == 1 else reqs[k - 2].input_len // 16 * 16  # the previous prompt
        assert r.cached == cached
        assert r.ttft == pytest.approx(0.005 + P.prefill_time(r.input_len - cached), abs=1e-12)
    for a, b in zip(reqs, reqs[1:]):  # the next turn goes out think_time after the reply
        assert b.t_send == pytest.approx(a.t_done + 0.5, abs=1e-12)


def test_prefix_cache_off_prefills_every_prompt_whole():
    reqs = run(P.replace(prefix_cache=False))
    assert all(r.cached == 0 for r in reqs)
    assert [r.ttft for r in reqs] == pytest.approx(
        [0.005 + P.prefill_time(r.input_len) for r in reqs], abs=1e-12)
    on = run()
    assert all(a.ttft < b.ttft for a, b in zip(on[1:], reqs[1:]))


def test_round_robin_scatters_turns_over_two_prefills():
    # one conversation on 2P1D: turns alternate P0, P1, P0, P1; P1 has seen nothing at
    # turn 2; turn 3 finds turn 1's prompt on P0, turn 4 turn 2's on P1
    reqs = run(dep="2P1D")
    assert [r.cached for r in reqs] == [0, 0, reqs[0].input_len // 16 * 16,
                                        reqs[1].input_len // 16 * 16]


def test_the_system_prompt_is_shared_across_conversations():
    reqs = run(load=FixedLoad(1, 2))  # two conversations one after the other, one client
    second = [r for r in reqs if r.conversation == 1]
    assert second[0].turn == 1 and second[0].cached == 100 // 16 * 16  # 6 pages of system
    assert second[0].t_send == pytest.approx(reqs[3].t_done, abs=1e-12)  # no think time
    # two at once: their turn-1 prompts are prefilled together, neither is a hit yet
    both = run(load=FixedLoad(2, 2))
    assert [r.cached for r in both if r.turn == 1] == [0, 0]
    assert all(r.cached > 100 for r in both if r.turn > 1)


def test_cached_prefixes_are_whole_pages():
    mt = MultiTurn(turns=2, system_len=32, user_min=1, user_max=1, output_min=1, output_max=1)
    a, b = run(mt=mt, load=FixedLoad(1, 2))[1:3]  # conv 0 turn 2; conv 1 turn 1 (33 tokens)
    assert a.input_len == 35 and a.cached == 32  # turn 1 had 33 tokens: 2 full pages
    assert b.input_len == 33 and b.cached == 32
    tiny = MultiTurn(turns=1, system_len=15, user_min=1, user_max=1, output_min=1, output_max=1)
    assert run(mt=tiny, load=FixedLoad(1, 2))[1].cached == 0  # less than one page
    assert run(P.replace(page_size=1), mt=tiny, load=FixedLoad(1, 2))[1].cached == 15


def test_summary_per_turn_and_hit_rate():
    s = simulate_run(P, Deployment(1, 1), MT, FixedLoad(3, 6), label="1P1D")
    assert (s.number, s.completed, s.concurrency) == (24, 24, 3)
    assert [t.turn for t in s.per_turn] == [1, 2, 3, 4]
    assert all(t.completed == 6 for t in s.per_turn)
    assert s.per_turn[1].hit_rate > 0.6 and s.per_turn[3].hit_rate > s.per_turn[1].hit_rate
    assert s.per_turn[1].ttft.mean < s.per_turn[0].ttft.mean
    assert 0 < s.cache_hit_rate < 1
    off = simulate_run(P.replace(prefix_cache=False), Deployment(1, 1), MT, FixedLoad(3, 6))
    assert off.total_cached_tokens == 0 and off.total_input_tokens == s.total_input_tokens
    with pytest.raises(ValueError, match="FixedLoad"):
        run(load=RateLoad(1.0, 4))
    with pytest.raises(ValueError, match="turns"):
        MultiTurn(0, 10, 1, 1, 1, 1)


def test_profile_keeps_prefix_cache_fields(tmp_path):
    p = P.replace(prefix_cache=False, page_size=32)
    p.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == p
    old = {k: v for k, v in P.to_dict().items() if k not in ("prefix_cache", "page_size")}
    (tmp_path / "old.json").write_text(json.dumps({"profile": old}))
    assert Profile.load(tmp_path / "old.json").prefix_cache is True  # older files: defaults
    with pytest.raises(ValueError, match="page_size"):
        P.replace(page_size=0)


def test_simulate_command_multi_turn(tmp_path, capsys):
    P.save(tmp_path / "p.json")
    common = ["simulate", "--profile", str(tmp_path / "p.json"), "--workload", "multi-turn",
              "--turns", "3", "--system-prompt-len", "256", "--input-len", "32",
              "--output-len", "8", "--parallel", "2", "--deployments", "1P1D", "2P1D"]
    assert main([*common, "--json", str(tmp_path / "on.json")]) == 0
    out = capsys.readouterr().out
    assert out.count("per turn") == 2 and out.count("cache hit rate") == 2
    assert main([*common, "--no-prefix-cache", "--json", str(tmp_path / "off.json")]) == 0
    assert "prefix cache off" in capsys.readouterr().out
    on, off = (json.loads((tmp_path / f"{n}.json").read_text())["runs"] for n in ("on", "off"))
    for a, b in zip(on, off):
        assert len(a["per_turn"]) == 3 and a["number"] == 2 * 3
        assert a["per_turn"][2]["ttft"]["mean"] < b["per_turn"][2]["ttft"]["mean"]
        assert b["total_cached_tokens"] == 0 < a["total_cached_tokens"]


@pytest.mark.parametrize("args, message", [
    (["--turns", "3"], "--turns need --workload multi-turn"),
    (["--workload", "multi-turn", "--rate", "1"], "not --calibrate-from-table, --compare"),
    (["--workload", "multi-turn", "--parallel", "2", "--number", "4"],
     "counts --conversations, not --number"),
    (["--workload", "multi-turn", "--turns", "0"], "turns >= 1"),
    (["--workload", "multi-turn", "--parallel", "1", "2", "--conversations", "1", "2", "3"],
     "--conversations takes one value"),
])
def test_simulate_bad_multi_turn_flags_exit_2(args, message, tmp_path, capsys):
    P.save(tmp_path / "p.json")
    assert main(["simulate", "--profile", str(tmp_path / "p.json"), *args]) == 2
    assert message in capsys.readouterr().err
