"""A worker's tensor-parallel ranks (pdmesh/runtime/tp/ranks.py): rank 0 in this process
as the Engine's runner, rank 1 a real follower process (gloo). The Engine's greedy
output through the group equals the Engine alone (float32); every rank's pool is mapped
here; a follower killed with -9 makes the worker's engine loop fail at once, idle or not.
"""
from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from pdmesh import Engine, SamplingParams
from pdmesh.runtime.tp.ranks import RankGroup
from pdmesh.worker.engine_loop import EngineLoop
from test_tp import TINY_PROMPTS, tiny_loaded, tiny_model

PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_model):
    folder = tmp_path_factory.mktemp("tiny_tp_ranks")
    tiny_model(folder, "llama", default_model, seed=3)
    return folder, tiny_loaded(folder, default_model.tokenizer)


def engine(tiny) -> Engine:
    folder, loaded = tiny
    return Engine(model=str(folder), loaded=loaded, dtype="float32", page_size=16, num_pages=64)


@pytest.fixture(scope="module")
def group(tiny):
    eng = engine(tiny)
    g = RankGroup.attach(eng, 2)
    yield eng, g
    g.close()


def test_engine_on_two_ranks_equals_engine_alone(tiny, group):
    eng, g = group
    want = [o.token_ids for o in engine(tiny).generate(prompt_token_ids=TINY_PROMPTS,
                                                         params=PARAMS)]
    assert eng.runner is g
    assert [o.token_ids for o in eng.generate(prompt_token_ids=TINY_PROMPTS,
                                               params=PARAMS)] == want
    # each rank holds its own KV head of the pages, mapped here: both were written
    assert [p.shape[4] for p in g.pools] == [1, 1]
    assert [pl.kv_heads for pl in g.plans] == [(0, 1), (1, 2)]
    assert all(bool(p.abs().sum() > 0) for p in g.pools)
    lay = g.layout("tiny")  # the logical pool peers see: both KV heads of a page
    assert (lay.num_kv_heads, lay.num_pages) == (2, 64)
    assert lay.bytes_per_page == 2 * g.pools[0][0].numel() * g.pools[0].element_size()


def test_a_tp_size_that_splits_no_heads_is_refused_before_any_rank_starts(tiny, group):
    eng = group[0]  # its config, not its runner: nothing is started
    with pytest.raises(ValueError, match="tp 3 does not divide the 4 attention heads"):
        RankGroup.attach(eng, 3)
    assert eng.runner is group[1]


def test_killed_follower_fails_the_engine_loop(group):
    eng, g = group  # last: this kills the module's group (one process group per process)
    failed = threading.Event()
    loop = EngineLoop(eng, lambda events: None, on_failure=lambda e: failed.set()).start()
    try:
        os.kill(g.procs[0].pid, signal.SIGKILL)
        assert failed.wait(30), "the idle engine loop did not notice the dead rank"
        assert "tensor-parallel rank 1" in str(loop.error)
        with pytest.raises(RuntimeError, match="rank 1"):
            g.run(None)
    finally:
        loop.stop()
        g.close()  # no stop broadcast to a dead group: returns at once
    assert all(p.poll() is not None for p in g.procs)
    assert torch.distributed.is_initialized() is False
