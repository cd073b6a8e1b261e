"""EngineLoop + AsyncEngine: typed commands in, batched events out, outputs never mixed."""
from __future__ import annotations

import asyncio
import threading

import pytest

from pdmesh import Engine, SamplingParams
from pdmesh.runtime.request import Mode
from pdmesh.worker.aio_engine import AsyncEngine
from pdmesh.worker.commands import (Abort, Add, Adopt, EngineStats, Held, Hold, MakeRequest,
                                    Start)
from pdmesh.worker.engine_loop import EngineLoop
from pdmesh.worker.streams import StreamClosed

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
QUESTIONS = ["Hi", "What is 2+2?", "Name a fruit.", "Write one word.", "Count to three.", "Why?"]


@pytest.fixture(scope="module")
def engine(default_model):
    return Engine(loaded=default_model, page_size=8, num_pages=400)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def drain(stream) -> list:
    outs = []
    while not outs or not outs[-1].finished:
        outs += await stream.next_batch()
    return outs


def test_concurrent_requests_match_offline_and_never_mix(engine):
    prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": q}])
               for q in QUESTIONS]
    want = [o.token_ids for o in engine.generate(prompt_token_ids=prompts, params=GREEDY)]

    async def main():
        eng = AsyncEngine(engine)
        try:
            reqs = [await eng.make_request(p, GREEDY, f"t{i}", Mode.GENERATE, detokenize=True)
                    for i, p in enumerate(prompts)]
            return await asyncio.gather(*(drain(eng.add(r)) for r in reqs))
        finally:
            eng.stop()
    for i, outs in enumerate(run(main())):
        assert {o.request_id for o in outs} == {f"t{i}"}
        streamed = [t for o in outs for t in o.new_token_ids]
        assert streamed == outs[-1].token_ids == want[i]
        assert "".join(o.new_text for o in outs) == outs[-1].text
    assert engine.stats()["used_pages"] == 0


def test_workers_skip_detokenization_unless_stop_strings_need_it(engine):
    """A worker's outputs carry token ids only (the gateway makes the text): same tokens,
    no text, and a stop string still ends the request where it completes."""
    ids = engine.tokenizer.encode("Count: 1, 2, 3,")
    full = engine.generate(prompt_token_ids=ids, params=GREEDY)[0]
    stop = full.text[len(full.text) // 2:][:3]

    async def main():
        eng = AsyncEngine(engine)
        try:
            plain = await eng.make_request(ids, GREEDY, "plain", Mode.GENERATE)
            params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop])
            stopped = await eng.make_request(ids, params, "stop", Mode.GENERATE)
            return await asyncio.gather(drain(eng.add(plain)), drain(eng.add(stopped)))
        finally:
            eng.stop()
    plain, stopped = run(main())
    assert plain[-1].token_ids == full.token_ids and plain[-1].text == ""
    assert all(o.new_text == "" for o in plain)
    assert stopped[-1].finish_reason == "stop" and stopped[-1].stop_reason == stop
    assert len(stopped[-1].token_ids) < len(full.token_ids)


def test_events_come_in_one_batch_per_step(engine):
    """Every decode step hands all its requests' outputs over in one call (one wake-up
    of the event loop per step, not one per token per request)."""
    batches, done = [], threading.Event()

    def on_events(events):
        batches.append(events)
        if sum(o.finished for b in batches for o in b) == 4:
            done.set()
    loop = EngineLoop(engine, on_events).start()
    try:
        for i in range(4):
            req = loop.submit(MakeRequest([1, 2, 3, 4 + i], GREEDY, f"b{i}", Mode.GENERATE))
            loop.submit(Add(req.result(10)))
        assert done.wait(60)
    finally:
        loop.stop()
    assert max(len(b) for b in batches) == 4  # the four decode together
    assert sum(len(b) for b in batches) == 4 * GREEDY.max_tokens
    assert isinstance(loop.stats, EngineStats) and loop.stats.used_pages == 0


def test_adopted_first_token_goes_out_before_the_next_step(engine):
    """The prefill's first token of an adopted request is handed over as soon as the
    Adopt command ran, in a batch of its own: not held back until a decode step ended
    (that step would add a whole TPOT to a PD request's TTFT)."""
    batches, done = [], threading.Event()

    def on_events(events):
        batches.append([e for e in events if not isinstance(e, Held)])
        if any(getattr(o, "finished", False) for o in events):
            done.set()
    loop = EngineLoop(engine, on_events).start()
    try:
        req = loop.submit(MakeRequest([1, 2, 3, 4, 5], GREEDY, "ad", Mode.ADOPTED)).result(10)
        loop.submit(Hold(req)).result(10)
        loop.submit(Adopt("ad", 42, None)).result(10)
        assert done.wait(60)
    finally:
        loop.stop()
    outs = [b for b in batches if b]
    assert [o.new_token_ids for o in outs[0]] == [[42]]  # alone: no step's token with it
    assert sum(len(o.new_token_ids) for b in outs for o in b) == GREEDY.max_tokens


def test_preallocation_queue_waits_for_pages_in_order(default_model):
    small = Engine(loaded=default_model, page_size=8, num_pages=6)
    held: list[Held] = []
    loop = EngineLoop(small, lambda evs: held.extend(e for e in evs if isinstance(e, Held)))
    loop.start()
    try:
        ids = list(range(300, 345))  # 45 prompt tokens -> 6 pages: one request fills the pool
        for rid in ("a", "b", "c"):
            req = loop.submit(MakeRequest(ids, GREEDY, rid, Mode.ADOPTED)).result(10)
            loop.submit(Hold(req)).result(10)
        assert [h.request_id for h in held] == ["a"] and len(held[0].pages) == 6
        assert loop.stats.prealloc_queue == 2
        assert loop.submit(Abort("a")).result(10)
        loop.submit(Abort("nobody")).result(10)  # one more turn: the queue was drained
        assert [h.request_id for h in held] == ["a", "b"]
        assert loop.submit(Abort("c")).result(10)  # cancelled while still queued
        loop.submit(Abort("b")).result(10)
        loop.submit(Abort("nobody")).result(10)
        assert loop.stats.prealloc_queue == 0 and loop.stats.free_pages == 6
    finally:
        loop.stop()


def test_abort_mid_generation_frees_pages_and_closes_the_stream(engine):
    async def main():
        eng = AsyncEngine(engine)
        try:
            req = await eng.make_request(engine.tokenizer.encode("Tell me a long story."),
                                         SamplingParams(max_tokens=200, ignore_eos=True),
                                         "long", Mode.GENERATE)
            stream = eng.add(req)
            n = len(await stream.next_batch())
            assert await eng.abort("long")
            with pytest.raises(StreamClosed):
                while True:
                    n += len(await stream.next_batch())
            return n
        finally:
            eng.stop()
    assert run(main()) < 200
    assert engine.stats()["used_pages"] == 0


def test_cancelled_hold_gives_its_pages_back(default_model):
    small = Engine(loaded=default_model, page_size=8, num_pages=6)

    async def main():
        eng = AsyncEngine(small)
        try:
            a = await eng.make_request(list(range(40)), GREEDY, "a", Mode.ADOPTED)
            b = await eng.make_request(list(range(40)), GREEDY, "b", Mode.ADOPTED)
            assert len(await eng.hold(a)) == 5
            waiting = asyncio.ensure_future(eng.hold(b))
            await asyncio.sleep(0.2)
            assert not waiting.done() and eng.stats.prealloc_queue == 1
            waiting.cancel()
            await asyncio.sleep(0.1)
            await eng.abort("a")
            await eng.abort("nobody")
            return eng.stats
        finally:
            eng.stop()
    stats = run(main())
    assert stats.free_pages == 6 and stats.prealloc_queue == 0


def test_errors_come_back_through_the_future(engine):
    loop = EngineLoop(engine, lambda evs: None).start()
    try:
        with pytest.raises(KeyError):
            loop.submit(Adopt("nobody", 5)).result(timeout=10)
        with pytest.raises(TypeError, match="not an engine command"):
            loop.submit("add please").result(timeout=10)
        with pytest.raises(ValueError):
            loop.submit(MakeRequest([10 ** 9], GREEDY, "bad", Mode.GENERATE)).result(10)
    finally:
        loop.stop()


def test_start_makes_and_queues_in_one_command(engine):
    """Start = MakeRequest + Add in one turn: its result is the engine's queued Request;
    a bad one raises and queues nothing."""
    events: list = []
    loop = EngineLoop(engine, events.extend).start()
    try:
        with pytest.raises(ValueError):
            loop.submit(Start(MakeRequest([10 ** 9], GREEDY, "bad", Mode.GENERATE))).result(10)
        assert "bad" not in engine.requests and loop.stats.waiting == 0
        req = loop.submit(Start(MakeRequest([1, 2, 3, 4], GREEDY, "s", Mode.GENERATE))).result(10)
        assert engine.requests.get("s") is req
        for _ in range(200):
            if any(getattr(e, "finished", False) for e in list(events)):
                break
            threading.Event().wait(0.05)
    finally:
        loop.stop()
    outs = [e for e in events if getattr(e, "request_id", None) == "s"]
    assert outs[-1].finished and len(outs[-1].token_ids) == GREEDY.max_tokens
    assert engine.stats()["used_pages"] == 0


def test_stopped_loop_refuses_work(default_model):
    lp = EngineLoop(Engine(loaded=default_model, num_pages=16), lambda evs: None).start()
    lp.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        lp.submit(Abort("x")).result(timeout=10)


class _Boom(RuntimeError):
    pass


def test_a_failed_step_stops_the_loop_and_fails_everything(engine):
    """A step that raises (an engine bug, a device error) leaves the engine in an unknown
    state: the loop stops, says why once (on_failure), every later command fails with
    that reason, and AsyncEngine ends every stream and pending hold with EngineFailed."""
    from pdmesh.worker.streams import EngineFailed

    async def main():
        eng = AsyncEngine(engine)
        failures = []
        eng.add_failure_listener(failures.append)
        real_step = engine.step

        def step():
            raise _Boom("device fell off the bus")
        try:
            req = await eng.make_request([1, 2, 3], GREEDY, "boom", Mode.GENERATE)
            engine.step = step
            stream = eng.add(req)
            with pytest.raises(EngineFailed, match="device fell off the bus"):
                await drain(stream)
            for _ in range(100):
                if failures:
                    break
                await asyncio.sleep(0.01)
            assert len(failures) == 1 and isinstance(failures[0], _Boom)
            with pytest.raises(RuntimeError, match="the engine failed"):
                await eng.make_request([4, 5], GREEDY, "late", Mode.GENERATE)
        finally:
            engine.step = real_step
            eng.stop()
    run(main())
    engine.abort("boom")  # the request the failed step left behind (the fixture is shared)
    assert engine.stats()["used_pages"] == 0
