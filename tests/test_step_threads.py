"""CPU thread defaults: `pdmesh serve` gives each worker its share of the cores for
prefill steps and one core fewer among them for decode steps, with passive OpenMP waits
where several workers share the cores (a lone worker, and the prefill workers of a
prefill + decode mesh, keep OpenMP's spinning waits), and the decode workers of such a
mesh nice 19; a worker takes them from the environment or --threads / --prefill-threads;
the engine applies the count of each step's kind, and the nice value, in the thread that
steps it."""
from __future__ import annotations

import argparse
import os
import threading

import pytest
import torch

from pdmesh import Engine, SamplingParams
from pdmesh.commands import decode as decode_cmd
from pdmesh.commands import serve
from pdmesh.commands.worker_common import configs_from_args
from pdmesh.config import EngineConfig

THREAD_ENV = ("OMP_NUM_THREADS", "PDMESH_NUM_THREADS", "PDMESH_PREFILL_THREADS",
              "OMP_WAIT_POLICY", "PDMESH_CPU_NICE")


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
    """(prefill threads, decode threads) per worker; passive waits where workers share the
    cores, except a PD mesh's prefill workers, whose decode workers step at nice 19."""
    pd = set(roles) == {P, D}
    for i, (prefill, decode) in enumerate(want):
        got = serve.worker_threads(roles, i, cores, {})
        passive = len(roles) > 1 and not (pd and roles[i] == P)
        extra = {"OMP_WAIT_POLICY": "PASSIVE"} if passive else {}
        if pd and roles[i] == D:
            extra["PDMESH_CPU_NICE"] = "19"
        assert got == {"OMP_NUM_THREADS": str(prefill), "PDMESH_PREFILL_THREADS": str(prefill),
                       "PDMESH_NUM_THREADS": str(decode), **extra}


def test_serve_thread_rule_with_colocated_workers_keeps_priorities():
    """A colocated worker beside a prefill worker prefills too: nobody is niced, everyone
    waits passively."""
    for i in range(2):
        got = serve.worker_threads([P, C], i, 2, {})
        assert got["OMP_WAIT_POLICY"] == "PASSIVE" and "PDMESH_CPU_NICE" not in got


def test_serve_thread_rule_respects_the_environment():
    # OMP_NUM_THREADS given: every step runs that many (as before), nothing added
    assert serve.worker_threads([C], 0, 2, {"OMP_NUM_THREADS": "2"}) == {}
    got = serve.worker_threads([C], 0, 2, {"PDMESH_NUM_THREADS": "2", "OMP_WAIT_POLICY": "x"})
    assert got == {"OMP_NUM_THREADS": "2", "PDMESH_PREFILL_THREADS": "2"}


def test_serve_children_get_the_rule(monkeypatch):
    for k in THREAD_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(serve.os, "cpu_count", lambda: 2)
    pre, dec = serve._worker_env([P, D], "token")
    assert (pre["PDMESH_PREFILL_THREADS"], dec["PDMESH_PREFILL_THREADS"]) == ("2", "1")
    assert dec["PDMESH_NUM_THREADS"] == "1" and dec["OMP_WAIT_POLICY"] == "PASSIVE"
    assert dec["PDMESH_CPU_NICE"] == "19" and "OMP_WAIT_POLICY" not in pre  # prefill first
    (alone,) = serve._worker_env([C], "token")  # a lone worker: OpenMP's spinning waits
    assert alone["PDMESH_PREFILL_THREADS"] == "2" and "OMP_WAIT_POLICY" not in alone
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


def _nice(tid: int) -> int | None:
    """A thread's nice value; None when it ended meanwhile (a short-lived thread of
    torch or the tokenizer: it failed CI once with ProcessLookupError)."""
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except ProcessLookupError:
        return None


def _nice_probe() -> tuple[list[int], list[int | None], bool]:
    """In a fresh process: (nice of the stepping thread at each step, nice of each thread
    it started, read at its later steps, whether the calling thread kept its nice)."""
    from pdmesh.runtime.loader import load_model

    e = Engine(loaded=load_model("default"), num_pages=64, num_threads=1, prefill_threads=2,
               cpu_nice=19)
    seen: list[int] = []
    during: list[int | None] = []
    run = e.runner.run
    before = set(os.listdir("/proc/self/task"))

    def spy(batch):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        if len(seen) > 1:  # read while the stepping thread lives: libgomp ends the pool of
            # a thread that exits, so read after the generation it may be gone (CI, 12-02)
            me = threading.get_native_id()  # itself at 19 too: only the threads it started
            during.extend(_nice(int(t)) for t in set(os.listdir("/proc/self/task")) - before
                          if int(t) != me)
        return run(batch)
    e.runner.run = spy
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    _threads_per_kind(e)
    return seen, during, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


def test_cpu_nice_lowers_the_stepping_thread_only():
    """The thread that steps the engine takes cpu_nice at its first step, the OpenMP
    threads it starts inherit it, and the process's other threads keep theirs. In a fresh
    process: OpenMP and torch keep thread state per process, and after other tests in the
    same one (pytest -n 2) a step once started no thread of its own (CI, 2026-12-01)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        seen, nices, kept = pool.apply(_nice_probe)
    assert seen and set(seen) == {19}
    # after the first (2-thread prefill) step the stepping thread's OpenMP pool has one
    # more thread, at nice 19 (the tokenizer's threads, started before it, keep 0)
    assert 19 in nices, nices
    assert kept
    with pytest.raises(ValueError, match="cpu_nice"):
        EngineConfig(cpu_nice=20)


def test_prefill_threads_keep_greedy_tokens(default_model):
    """fp32 numerics as the exactness tests run them: 1 vs 2 prefill threads, same tokens."""
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = ["The capital of France is", "def fib(n):"]
    a = Engine(loaded=default_model, num_pages=64, dtype="float32", num_threads=1)
    b = Engine(loaded=default_model, num_pages=64, dtype="float32", num_threads=1,
               prefill_threads=2)
    assert [o.token_ids for o in a.generate(prompts, p)] == \
        [o.token_ids for o in b.generate(prompts, p)]
