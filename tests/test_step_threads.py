"""CPU thread defaults: `pdmesh serve` gives each worker its share of the cores for
prefill steps and one core fewer among them for decode steps, and a decode worker beside
prefill workers SCHED_IDLE; a worker takes them from the environment or --threads /
--prefill-threads; the engine applies the count of each step's kind, and the policy, in
the thread that steps it."""
from __future__ import annotations

import argparse
import os
import subprocess
import threading

import pytest
import requests
import torch
from mesh_procs import start_serve

from pdmesh import Engine, SamplingParams
from pdmesh.commands import decode as decode_cmd
from pdmesh.commands import serve
from pdmesh.commands.worker_common import configs_from_args
from pdmesh.config import EngineConfig, WorkerConfig, engine_config_from_env

THREAD_ENV = ("OMP_NUM_THREADS", "PDMESH_NUM_THREADS", "PDMESH_PREFILL_THREADS",
              "PDMESH_CPU_IDLE")


C, P, D = "colocated", "prefill", "decode"


@pytest.mark.parametrize("roles, cores, want", [
    # colocated on the 2-core dev VM: both cores to prefill, the gateway keeps one in decode
    ([C], 2, [(2, 1)]),
    ([P, D], 2, [(2, 1), (1, 1)]),  # 1P1D there: the prefill worker prefills on both
    ([P, P, D], 2, [(1, 1), (1, 1), (1, 1)]),  # more workers than cores: never 0
    ([C], 16, [(16, 15)]),
    ([P, D, D], 16, [(16, 7), (5, 7), (5, 7)]),
])
def test_serve_thread_rule(roles, cores, want):
    """(prefill threads, decode threads) per worker; a decode worker beside a prefill
    worker steps at SCHED_IDLE; OpenMP keeps its default (spinning) waits."""
    for i, (prefill, decode) in enumerate(want):
        got = serve.worker_threads(roles, i, cores, {})
        idle = {"PDMESH_CPU_IDLE": "1"} if roles[i] == D and P in roles else {}
        assert got == {"OMP_NUM_THREADS": str(prefill), "PDMESH_PREFILL_THREADS": str(prefill),
                       "PDMESH_NUM_THREADS": str(decode), **idle}


def test_serve_thread_rule_respects_the_environment():
    # OMP_NUM_THREADS given: every step runs that many (as before), nothing added
    assert serve.worker_threads([C], 0, 2, {"OMP_NUM_THREADS": "2"}) == {}
    got = serve.worker_threads([C], 0, 2, {"PDMESH_NUM_THREADS": "2"})
    assert got == {"OMP_NUM_THREADS": "2", "PDMESH_PREFILL_THREADS": "2"}
    got = serve.worker_threads([P, D], 1, 2, {"PDMESH_CPU_IDLE": "0"})
    assert "PDMESH_CPU_IDLE" not in got and got["PDMESH_NUM_THREADS"] == "1"


def test_serve_children_get_the_rule(monkeypatch):
    for k in THREAD_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(serve.os, "cpu_count", lambda: 2)
    pre, dec = serve._worker_env([P, D], "token")
    assert (pre["PDMESH_PREFILL_THREADS"], dec["PDMESH_PREFILL_THREADS"]) == ("2", "1")
    assert dec["PDMESH_NUM_THREADS"] == "1" and dec["PDMESH_CPU_IDLE"] == "1"
    assert "PDMESH_CPU_IDLE" not in pre and "OMP_WAIT_POLICY" not in dec
    assert pre["PDMESH_CLUSTER_TOKEN"] == dec["PDMESH_CLUSTER_TOKEN"] == "token"


def _decode_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    decode_cmd.add_arguments(p)
    return p.parse_args(list(argv))


def test_worker_takes_threads_from_env_and_flags(monkeypatch):
    monkeypatch.setenv("PDMESH_NUM_THREADS", "1")
    monkeypatch.setenv("PDMESH_PREFILL_THREADS", "2")
    _, eng = configs_from_args(_decode_args(), "decode")
    assert (eng.num_threads, eng.prefill_threads) == (1, 2)
    _, eng = configs_from_args(_decode_args("--threads", "3", "--prefill-threads", "4"),
                               "decode")
    assert (eng.num_threads, eng.prefill_threads) == (3, 4)  # flags win
    with pytest.raises(ValueError, match="prefill_threads"):
        EngineConfig(prefill_threads=0)


def _threads_per_kind(engine: Engine) -> dict[str, set[int]]:
    """Generate on a fresh thread (a worker steps its engine on its own thread); the torch
    thread count each batch kind ran with."""
    seen: dict[str, set[int]] = {"prefill": set(), "decode": set()}
    run = engine.runner.run

    def spy(batch):
        seen[batch.kind].add(torch.get_num_threads())
        return run(batch)
    engine.runner.run = spy
    out = []
    t = threading.Thread(target=lambda: out.extend(engine.generate(
        ["The capital of France is", "One, two, three,"],
        SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))))
    t.start()
    t.join()
    assert [len(o.token_ids) for o in out] == [4, 4]
    return seen


def test_engine_applies_prefill_and_decode_threads(default_model):
    e = Engine(loaded=default_model, num_pages=64, num_threads=1, prefill_threads=2)
    assert _threads_per_kind(e) == {"prefill": {2}, "decode": {1}}


def test_engine_without_thread_settings_leaves_them(default_model):
    e = Engine(loaded=default_model, num_pages=64)
    before = torch.get_num_threads()
    seen = _threads_per_kind(e)
    assert len(seen["prefill"] | seen["decode"]) == 1  # never switched
    assert torch.get_num_threads() == before


def _policies(pid: int | str = "self") -> dict[int, int]:
    """native thread id -> scheduling policy, for every thread of process `pid` (/proc)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = int(open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1]
                                .split()[38])  # field 41, policy
        except OSError:  # the thread ended meanwhile
            pass
    return out


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_cpu_idle_puts_the_stepping_thread_and_its_openmp_threads_at_sched_idle(default_model):
    """The engine's stepping thread takes SCHED_IDLE at its first step, and the OpenMP
    threads its 2-thread prefill starts inherit it; the thread that built the engine and
    every other thread of the process keep their policy."""
    before = _policies()
    e = Engine(loaded=default_model, num_pages=64, num_threads=1, prefill_threads=2,
               cpu_idle=True)
    seen: list[tuple[int, int, set[int]]] = []  # (stepper, its policy, idle threads after)

    def run(batch, run=e.runner.run):
        out = run(batch)
        seen.append((threading.get_native_id(), os.sched_getscheduler(0),
                     {t for t, p in _policies().items() if p == os.SCHED_IDLE}))
        return out
    e.runner.run = run
    _threads_per_kind(e)
    stepper = {tid for tid, _, _ in seen}
    assert len(stepper) == 1 and {p for _, p, _ in seen} == {os.SCHED_IDLE}
    # after the 2-thread prefill: the stepper and its OpenMP worker, both new threads
    assert max(len(idle - set(before)) for _, _, idle in seen) >= 2
    now = _policies()
    assert all(now[t] == p for t, p in before.items() if t in now)  # nobody else moved


def _children(pid: int) -> dict[str, int]:
    """role ("prefill", "decode", "gateway", "core") -> pid of `pid`'s child running it."""
    ps = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid=,args="],
                        capture_output=True, text=True).stdout.splitlines()
    return {role: int(x.split()[0]) for x in ps
            for role, mark in (("prefill", "cli prefill "), ("decode", "cli decode "),
                               ("gateway", "cli gateway "), ("core", "core_process"))
            if mark in x}


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_serve_1p1d_runs_the_decode_engine_core_at_sched_idle():
    """End to end: `pdmesh serve --prefill 1 --decode 1` picking threads itself. The
    decode worker runs its engine core in a child process, every thread of it at
    SCHED_IDLE; its RPC process (streams, Transfer, heartbeats), the prefill worker and
    the gateway have none; the request was served."""
    proc, base, lines = start_serve("--prefill", "1", "--decode", "1", serve_threads=True)
    try:
        r = requests.post(f"{base}/completions", timeout=60, json={
            "model": "default", "prompt": "The capital of France is", "max_tokens": 4,
            "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        kids = _children(proc.pid)
        core = _children(kids["decode"])["core"]
        assert set(_policies(core).values()) == {os.SCHED_IDLE}
        for role in ("decode", "prefill", "gateway"):
            assert os.SCHED_IDLE not in _policies(kids[role]).values(), role
        assert "core" not in _children(kids["prefill"])  # in one process, as before on CPU
    finally:
        proc.terminate()
        proc.wait(30)


def test_cpu_idle_is_off_by_default_set_by_env_and_takes_the_engine_process(monkeypatch):
    assert EngineConfig().cpu_idle is False
    monkeypatch.setenv("PDMESH_CPU_IDLE", "1")
    idle = engine_config_from_env()
    assert idle.cpu_idle is True
    # on CPU an idle engine runs in its own process unless told otherwise
    assert WorkerConfig().uses_engine_process(idle)
    assert not WorkerConfig().uses_engine_process(EngineConfig())
    assert not WorkerConfig(engine_process=False).uses_engine_process(idle)


def test_prefill_threads_keep_greedy_tokens(default_model):
    """fp32 numerics as the exactness tests run them: 1 vs 2 prefill threads, same tokens."""
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = ["The capital of France is", "def fib(n):"]
    a = Engine(loaded=default_model, num_pages=64, dtype="float32", num_threads=1)
    b = Engine(loaded=default_model, num_pages=64, dtype="float32", num_threads=1,
               prefill_threads=2)
    assert [o.token_ids for o in a.generate(prompts, p)] == \
        [o.token_ids for o in b.generate(prompts, p)]
