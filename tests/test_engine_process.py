"""`--engine-process`: the engine core in a child process behind the EngineLoop interface
(pdmesh/worker/engine_proxy.py + core_process.py), with the real default model.

Same tokens and logprobs as the engine in this process; abort frees pages; an engine
failure, a killed child or a bad start each end in a clear error, never a hang; the
child dies with its worker even on kill -9. 256 streams through `pdmesh serve` with it
are in tests/test_concurrency.py.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess

import grpc
import pytest

from mesh_procs import start_registry, start_decode, terminate, wait_until
from pdmesh import Engine, SamplingParams
from pdmesh.config import EngineConfig, WorkerConfig
from pdmesh.runtime.request import Mode
from pdmesh.v1 import registry_pb2 as rpb
from pdmesh.v1 import registry_pb2_grpc as rgrpc
from pdmesh.worker.aio_engine import AsyncEngine
from pdmesh.worker.engine_proxy import EngineProcess, EngineProcessError
from pdmesh.worker.streams import EngineFailed, StreamClosed

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)
PROMPTS = ["Hi", "What is 2+2?", "Name a fruit.", "Count to three."]
ENGINE = EngineConfig(page_size=8, num_pages=300)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 180))


async def drain(stream) -> list:
    outs = []
    while not outs or not outs[-1].finished:
        outs += await stream.next_batch()
    return outs


def colocated() -> WorkerConfig:
    return WorkerConfig(role="colocated")


def test_same_tokens_and_logprobs_as_the_engine_in_process(default_model):
    engine = Engine(loaded=default_model, config=ENGINE)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    want = engine.generate(prompt_token_ids=prompts, params=GREEDY)

    async def main():
        proc = EngineProcess(colocated(), ENGINE, use_transport=False)
        # the ready line's parts: every phase of the child's start, in order
        names = [name for name, _ in proc.info.phases]
        assert names[0] == "engine process start" and names[1].startswith("imports")
        assert names[-1] == "engine loop start, gc freeze"
        assert all(s >= 0 for _, s in proc.info.phases)
        eng = AsyncEngine(process=proc)
        # before any command: the pool as it is (a worker registers with these)
        assert eng.stats.num_pages == eng.stats.free_pages == 300
        try:
            reqs = [await eng.make_request(p, GREEDY, f"r{i}", Mode.GENERATE, detokenize=True)
                    for i, p in enumerate(prompts)]
            outs = await asyncio.gather(*(drain(eng.add(r)) for r in reqs))
            return outs, eng.stats
        finally:
            await asyncio.to_thread(eng.stop)
    outs, stats = run(main())
    for i, o in enumerate(outs):
        assert {x.request_id for x in o} == {f"r{i}"}
        assert [t for x in o for t in x.new_token_ids] == o[-1].token_ids == want[i].token_ids
        assert o[-1].text == want[i].text and o[-1].finish_reason == "length"
        got = [lp.logprob for lp in o[-1].logprobs]
        assert got == pytest.approx([lp.logprob for lp in want[i].logprobs], abs=1e-4)
    assert stats.used_pages == 0 and stats.free_pages == stats.num_pages == 300
    assert stats.generation_tokens == 10 * len(PROMPTS)


def test_abort_frees_pages_and_a_bad_request_is_a_value_error(default_model):
    async def main():
        eng = AsyncEngine(process=EngineProcess(colocated(), ENGINE, use_transport=False))
        try:
            with pytest.raises(ValueError, match="max_tokens"):
                await eng.make_request([1, 2, 3], SamplingParams(max_tokens=0), "bad",
                                       Mode.GENERATE)
            long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
            req = await eng.make_request([1, 2, 3, 4], long, "long", Mode.GENERATE)
            stream = eng.add(req)
            await stream.next_batch()
            busy = eng.stats.used_pages
            assert await eng.abort("long") is True
            with pytest.raises(StreamClosed):
                await drain(stream)
            for _ in range(100):
                if eng.stats.used_pages == 0:
                    break
                await asyncio.sleep(0.05)
            return busy, eng.stats
        finally:
            await asyncio.to_thread(eng.stop)
    busy, stats = run(main())
    assert busy > 0 and stats.used_pages == 0 and stats.running == 0


def test_start_is_one_trip_and_a_bad_start_queues_nothing(default_model):
    """AsyncEngine.start (make + add) sends one command, not MakeRequest then Add; the
    front's copy of the request gets its scheduled time from the events that follow the
    reply in the same read; a bad one is a ValueError and leaves nothing queued."""
    engine = Engine(loaded=default_model, config=ENGINE)
    ids = engine.tokenizer.encode(PROMPTS[1])
    want = engine.generate(prompt_token_ids=[ids], params=GREEDY)[0].token_ids

    async def main():
        proc = EngineProcess(colocated(), ENGINE, use_transport=False)
        sent, send = [], proc.conn.send
        proc.conn.send = lambda msg: (msg[0] == "cmd" and sent.append(type(msg[2]).__name__),
                                      send(msg))[1]
        eng = AsyncEngine(process=proc)
        try:
            with pytest.raises(ValueError, match="token"):  # the engine's check, not the front's
                await eng.start([1, 10 ** 9], GREEDY, "bad", Mode.GENERATE)
            bad = eng.stats
            req, stream = await eng.start(ids, GREEDY, "s0", Mode.GENERATE)
            return bad, req, await drain(stream), sent, eng.stats
        finally:
            await asyncio.to_thread(eng.stop)
    bad, req, outs, sent, stats = run(main())
    assert bad.waiting == bad.running == 0 and bad.used_pages == 0
    assert sent == ["Start", "Start"]  # no MakeRequest + Add pair
    assert [t for o in outs for t in o.new_token_ids] == want
    assert req.request_id == "s0" and req.scheduled_time is not None
    assert stats.used_pages == 0 and stats.running == 0


def test_engine_failure_and_a_killed_core_end_streams_with_engine_failed(default_model):
    async def scenario(kill: bool):
        proc = EngineProcess(colocated(), ENGINE, use_transport=False)
        eng = AsyncEngine(process=proc)
        failures: list[BaseException] = []
        eng.add_failure_listener(failures.append)
        try:
            params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
            stream = eng.add(await eng.make_request([5, 6, 7], params, "x", Mode.GENERATE))
            await stream.next_batch()
            if kill:
                os.kill(proc.proc.pid, signal.SIGKILL)
            else:
                await eng.fail_next_step()
            with pytest.raises(EngineFailed) as err:
                await drain(stream)
            with pytest.raises(Exception):  # no engine behind it any more
                await eng.make_request([1], params, "y", Mode.GENERATE)
            return str(err.value), failures, proc.proc.wait(10)
        finally:
            await asyncio.to_thread(eng.stop)
    why, failures, code = run(scenario(kill=False))
    assert "on purpose" in why and len(failures) == 1 and code == 1
    why, failures, code = run(scenario(kill=True))
    assert "exited (code -9)" in why and len(failures) == 1 and code == -9


def test_a_core_that_cannot_start_says_why():
    with pytest.raises(EngineProcessError, match="did not start.*no-such-model"):
        EngineProcess(colocated(), EngineConfig(model="/nonexistent/no-such-model.gguf"),
                      use_transport=False)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return [int(x) for x in out.split()]


def test_the_core_dies_with_its_worker_even_on_kill_9():
    """...and an idle worker reports its whole pool free from registration on (found on
    the GPU, where the engine process is the default: an idle one reported 0 free)."""
    reg, reg_addr = start_registry()
    worker, addr = start_decode(reg_addr, "--role", "colocated", "--engine-process")
    try:
        ch = grpc.insecure_channel(reg_addr)
        listed = rgrpc.RegistryStub(ch).ListWorkers(rpb.ListWorkersRequest(), timeout=10)
        w = next(w for w in listed.workers if w.address == addr)
        assert w.load.free_kv_pages == w.capacity.num_pages > 0
        assert wait_until(lambda: _children(worker.pid), 60)
        core = _children(worker.pid)[0]
        assert "core_process" in open(f"/proc/{core}/cmdline").read()
        worker.kill()
        worker.wait(10)
        assert wait_until(lambda: not os.path.exists(f"/proc/{core}") or
                          "Z" in open(f"/proc/{core}/stat").read().split()[2], 10)
    finally:
        terminate(worker)
        terminate(reg)


def test_on_by_default_on_a_gpu_only():
    assert WorkerConfig().uses_engine_process(EngineConfig(device="cuda"))
    assert not WorkerConfig().uses_engine_process(EngineConfig(device="cpu"))
    assert WorkerConfig(engine_process=True).uses_engine_process(EngineConfig(device="cpu"))
    assert not WorkerConfig(engine_process=False).uses_engine_process(
        EngineConfig(device="cuda"))
