"""`pdmesh bench --workload multi-turn`: the conversation generator, per-turn metrics and
cache hit rate, the runner against a scripted server, CLI validation, and end to end
against a real `pdmesh serve` 1P1D mesh (prefix cache on: turns >= 2 report cached tokens)."""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys

import pytest

from pdmesh.bench.loadgen import ClientConfig, build_payload
from pdmesh.bench.metrics import RequestRecord, summarize
from pdmesh.bench.multiturn import MultiTurnSpec, MultiTurnWorkload, run_multi_turn
from pdmesh.bench.report import format_turn_table, from_json, load_results, to_json
from pdmesh.cli import main
from test_bench_loadgen import FIRST, GAP, PIECES, WordTokenizer, serving


class SpecialWordTokenizer(WordTokenizer):
    """WordTokenizer with special ids 0..9, which the generator must never draw."""
    all_special_ids = list(range(10))


def workload(**kw) -> MultiTurnWorkload:
    spec = dict(turns=3, system_prompt_len=12, user_len=(4, 7), output_len=(2, 5), seed=3)
    spec.update(kw)
    return MultiTurnWorkload(MultiTurnSpec(**spec), SpecialWordTokenizer())


def test_history_grows_and_carries_the_actual_replies():
    conv = workload().conversation(0)
    r1 = conv.request(1)
    assert r1.turn == 1 and [m["role"] for m in r1.messages] == ["system", "user"]
    assert r1.messages[0]["content"] == conv.system and r1.messages[1]["content"] == conv.users[0]
    assert r1.output_tokens == conv.output_tokens[0] and 2 <= r1.output_tokens <= 5
    with pytest.raises(ValueError, match="replies"):
        conv.request(2)  # no reply to turn 1 yet
    conv.add_reply(" the first reply", 3)
    r2 = conv.request(2)
    assert [m["role"] for m in r2.messages] == ["system", "user", "assistant", "user"]
    assert r2.messages[:2] == r1.messages
    assert r2.messages[2] == {"role": "assistant", "content": " the first reply"}
    assert r2.messages[3]["content"] == conv.users[1]
    # completions backend: turn 2's text extends turn 1's prompt and its reply
    assert r2.prompt.startswith(r1.prompt + " the first reply")
    assert r2.prompt_tokens == r1.prompt_tokens + 3 + conv.user_tokens[1]
    conv.add_reply(" second", 1)
    r3 = conv.request(3)
    assert len(r3.messages) == 6 and r3.messages[:4] == r2.messages[:4]
    assert r3.messages[4]["content"] == " second"
    chat = build_payload(ClientConfig("http://x/v1", model="m", backend="chat"), r3)
    assert chat["messages"] == list(r3.messages)
    comp = build_payload(ClientConfig("http://x/v1", model="m"), r3)
    assert comp["prompt"] == r3.prompt and "messages" not in comp


def test_seeded_shared_system_prompt_and_distinct_conversations():
    a, b = workload(), workload()
    assert a.system_prompt == b.system_prompt and a.system_prompt_tokens == 12
    convs = a.conversations(4)
    assert all(c.system == a.system_prompt for c in convs)  # one shared system prompt
    assert [c.users for c in convs] == [c.users for c in b.conversations(4)]  # seeded
    assert a.conversation(2).users == convs[2].users  # independent of how many are drawn
    firsts = [c.users[0] for c in convs]
    assert len(set(firsts)) == 4  # different conversations, different user messages
    assert all(4 <= n <= 7 for c in convs for n in c.user_tokens)
    other = workload(seed=4)
    assert other.system_prompt != a.system_prompt and other.conversation(0).users != firsts[0]
    words = " ".join([a.system_prompt] + [u for c in convs for u in c.users]).split()
    assert all(int(w[1:]) >= 10 for w in words)  # special ids are never drawn
    assert workload(system_prompt_len=0).conversation(0).request(1).messages[0]["role"] == "user"
    with pytest.raises(ValueError, match="turns"):
        MultiTurnSpec(turns=0)


def rec(turn, ttft, prompt, cached, ok=True):
    return RequestRecord(ok, "" if ok else "boom", prompt, 4 if ok else 0, ttft,
                         ttft + 0.3 if ok else 0.0, [0.1] * 3 if ok else [], 0.0,
                         cached_tokens=cached, turn=turn)


def test_per_turn_metrics_and_hit_rate_round_trip():
    records = [rec(1, 1.0, 100, 0), rec(1, 3.0, 100, 64), rec(2, 0.2, 150, 128),
               rec(2, 0.4, 150, 96), rec(3, 0.5, 0, 0, ok=False)]
    s = summarize(records, 10.0, concurrency=2)
    assert (s.total_input_tokens, s.total_cached_tokens) == (500, 288)
    assert s.cache_hit_rate == pytest.approx(288 / 500)
    t1, t2, t3 = s.per_turn
    assert (t1.turn, t1.completed, t1.failed, t1.prompt_tokens, t1.cached_tokens) == \
        (1, 2, 0, 200, 64)
    assert t1.ttft.mean == pytest.approx(2.0) and t1.hit_rate == pytest.approx(0.32)
    assert t1.ttft.p99 == pytest.approx(1.0 + 0.99 * 2.0)  # linear interpolation
    assert t2.ttft.mean == pytest.approx(0.3) and t2.hit_rate == pytest.approx(224 / 300)
    assert (t3.completed, t3.failed, t3.hit_rate) == (0, 1, 0.0)
    text = to_json([s], {"workload": "multi-turn"})
    assert [t["turn"] for t in json.loads(text)["runs"][0]["per_turn"]] == [1, 2, 3]
    assert from_json(text) == [s]
    table = format_turn_table(s).splitlines()
    assert "cache hit rate" in table[0] and len(table) == 2 + 3 + 1
    assert table[2].split() == ["1", "2", "2.000", "2.980", "200", "64", "32.0%"]
    assert table[4].split()[:3] == ["3", "0", "(1"] and table[5].split()[0] == "all"
    md = format_turn_table(s, markdown=True).splitlines()
    assert md[0].startswith("| turn | requests |") and md[3].startswith("| 2 | 2 | 0.300 |")
    plain = summarize([rec(0, 1.0, 10, 0)], 1.0)
    assert plain.per_turn == () and format_turn_table(plain) == ""


@pytest.mark.parametrize("backend", ["chat", "completions"])
def test_runner_sends_each_history_with_the_streamed_replies(backend):
    mt = workload(turns=3, think_time=0.2)

    async def go(url, server):
        s, recs = await run_multi_turn(ClientConfig(url, backend=backend), mt, 2, 3,
                                       label="mt", warmup_requests=1, progress=False)
        return s, recs, server

    s, recs, server = asyncio.run(serving(go))
    assert (s.number, s.completed, s.failed, s.concurrency) == (9, 9, 0, 2)
    assert server.max_in_flight <= 2 and len(server.bodies) == 1 + 9
    assert "ignore_eos" in server.bodies[0]  # the warm-up: a random single-turn prompt
    reply = "".join(f" word{i}" for i in range(PIECES))  # what the scripted server streams
    bodies = server.bodies[1:]
    if backend == "chat":
        assert bodies[0]["messages"][0]["content"] == mt.system_prompt
        lengths = sorted(len(b["messages"]) for b in bodies)
        assert lengths == [2, 2, 2, 4, 4, 4, 6, 6, 6]
        for b in bodies:
            assert [m["content"] for m in b["messages"] if m["role"] == "assistant"] == \
                [reply] * (len(b["messages"]) // 2 - 1)
    else:
        assert all(b["prompt"].startswith(mt.system_prompt) for b in bodies)
        assert sorted(b["prompt"].count("Assistant:" + reply) for b in bodies) == \
            [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [t.completed for t in s.per_turn] == [3, 3, 3]
    by_turn = {k: [r for r in recs if r.turn == k] for k in (1, 2, 3)}
    assert all(len(v) == 3 for v in by_turn.values())
    # one conversation's turns are sequential, with the think time in between
    first = min(by_turn[1], key=lambda r: r.start)
    nxt = min((r for r in by_turn[2] if r.start >= first.end), key=lambda r: r.start)
    assert nxt.start - first.end >= 0.2 - 1e-3
    # 3 conversations on 2 clients: at least 2 conversations back to back, 3 turns each
    assert s.duration_s >= 2 * 3 * (FIRST + 3 * GAP) + 2 * 2 * 0.2 - 0.05


@pytest.mark.parametrize("args, message", [
    (["--turns", "3", "--parallel", "1"], "--turns need --workload multi-turn"),
    (["--think-time", "1", "--conversations", "2", "--parallel", "1"],
     "--think-time, --conversations need --workload multi-turn"),
    (["--workload", "multi-turn", "--request-rate", "1"], "--request-rate is not supported"),
    (["--workload", "multi-turn", "--parallel", "1", "--number", "2"],
     "counts --conversations, not --number"),
    (["--workload", "multi-turn", "--parallel", "1", "--turns", "0"], "--turns must be >= 1"),
    (["--workload", "multi-turn", "--parallel", "1", "--system-prompt-len", "-1"],
     "--system-prompt-len must be >= 0"),
    (["--workload", "multi-turn", "--parallel", "1", "--think-time", "-0.5"],
     "--think-time must be >= 0"),
    (["--workload", "multi-turn", "--parallel", "1", "2", "--conversations", "1", "2", "3"],
     "--conversations takes one value or one per run"),
    (["--workload", "multi-turn", "--parallel", "1", "--conversations", "0"],
     "--conversations values must be >= 1"),
])
def test_bad_multi_turn_flags_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_multi_turn_against_a_1p1d_mesh(tmp_path):
    """2 conversations x 3 turns, a 64-token shared system prompt (4 pages of 16): turns
    >= 2 find it (and their own history) in the prefill's prefix cache."""
    import openai

    from mesh_procs import chat_when_routable, start_serve, worker_env

    def bench(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pdmesh.cli", "bench", *args], text=True,
                              capture_output=True, env=worker_env(), timeout=300)

    proc, base, lines = start_serve("--worker-arg=--kv-cache-bytes=50000000")
    try:
        chat_when_routable(openai.OpenAI(base_url=base, api_key="unused"), model="default",
                           messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        common = ["--base-url", base, "--workload", "multi-turn", "--turns", "3",
                  "--system-prompt-len", "64", "--input-len", "8", "12", "--output-len", "4",
                  "--parallel", "2", "--warmup", "0", "--no-progress"]
        chat = bench(*common, "--backend", "chat", "--label", "1P1D",
                     "--output", str(tmp_path / "chat.json"))
        comp = bench(*common, "--seed", "2", "--output", str(tmp_path / "comp.json"))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines)
    for res, name in ((chat, "chat"), (comp, "comp")):
        assert res.returncode == 0, res.stdout + res.stderr
        (run,), config = load_results((tmp_path / f"{name}.json").read_text())
        assert config["workload"] == "multi-turn" and config["system_prompt_tokens"] >= 32
        assert (run.number, run.completed, run.failed) == (6, 6, 0)
        assert run.total_output_tokens == 6 * 4
        assert [t.turn for t in run.per_turn] == [1, 2, 3]
        assert all(t.completed == 2 and t.ttft.mean > 0 for t in run.per_turn)
        prompts = [t.prompt_tokens for t in run.per_turn]
        assert prompts[0] < prompts[1] < prompts[2]  # the history grows
        assert all(t.cached_tokens > 0 for t in run.per_turn[1:]), run.per_turn
        assert 0 < run.cache_hit_rate < 1
        assert run.total_cached_tokens == sum(t.cached_tokens for t in run.per_turn)
        assert "per turn" in res.stdout and "cache hit rate" in res.stdout
        assert res.stdout.count("\n   2         2 ") == 1  # the turn-2 row
    # a later turn reuses more of its prompt than the first: its own history too
    (run,), _ = load_results((tmp_path / "chat.json").read_text())
    assert run.per_turn[2].hit_rate > run.per_turn[0].hit_rate
