"""EngineLoop: the engine on its own thread, fed from many threads, outputs never mixed."""
from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from pdmesh import Engine, SamplingParams
from pdmesh.runtime.request import Mode
from pdmesh.worker.engine_loop import EngineLoop

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
QUESTIONS = ["Hi", "What is 2+2?", "Name a fruit.", "Write one word.", "Count to three.", "Why?"]


@pytest.fixture(scope="module")
def engine(default_model):
    return Engine(loaded=default_model, page_size=8, num_pages=400)


@pytest.fixture
def loop(engine):
    lp = EngineLoop(engine).start()
    yield lp
    lp.stop()
    assert engine.stats()["used_pages"] == 0, "a test leaked pages"


def collect(loop: EngineLoop, req) -> tuple[list, threading.Event]:
    outs, done = [], threading.Event()

    def on_output(out):
        outs.append(out)
        if out.finished:
            done.set()
    loop.add(req, on_output).result(timeout=10)
    return outs, done


def test_requests_from_many_threads_match_offline_and_never_mix(engine, loop):
    prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": q}])
               for q in QUESTIONS]
    # the offline reference runs on the loop thread too: only that thread touches the engine
    offline = loop.call(lambda: engine.generate(prompt_token_ids=prompts, params=GREEDY))
    want = [o.token_ids for o in offline.result(timeout=120)]
    results: dict[int, tuple[list, threading.Event]] = {}

    def client(i: int) -> None:
        req = engine.make_request(prompt_token_ids=prompts[i], params=GREEDY, request_id=f"t{i}")
        results[i] = collect(loop, req)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (outs, done) in results.items():
        assert done.wait(60)
        assert {o.request_id for o in outs} == {f"t{i}"}
        streamed = [t for o in outs for t in o.new_token_ids]
        assert streamed == outs[-1].token_ids == want[i]
        assert "".join(o.new_text for o in outs) == outs[-1].text


def test_preallocation_queue_waits_for_pages_in_order(default_model):
    small = Engine(loaded=default_model, page_size=8, num_pages=6)
    loop = EngineLoop(small).start()
    try:
        ids = list(range(300, 330))  # 30 + 12 - 1 tokens -> 6 pages: one request fills the pool
        held: dict[str, Future] = {}
        for rid in ("a", "b", "c"):
            req = small.make_request(prompt_token_ids=ids, params=GREEDY, request_id=rid,
                                     mode=Mode.ADOPTED)
            held[rid] = Future()
            loop.hold(req, held[rid].set_result).result(timeout=10)
        assert len(held["a"].result(timeout=10)) == 4  # the prompt's pages
        assert not held["b"].done() and loop.stats().result()["prealloc_queue"] == 2
        assert loop.abort("a").result(timeout=10)
        assert held["b"].result(timeout=10) and not held["c"].done()
        assert loop.abort("c").result(timeout=10)  # cancelled while still queued
        assert loop.stats().result()["prealloc_queue"] == 0
        loop.abort("b").result(timeout=10)
        assert small.stats()["free_pages"] == 6
    finally:
        loop.stop()


def test_abort_mid_generation_frees_pages_and_stops_outputs(engine, loop):
    req = engine.make_request(prompt="Tell me a long story.", request_id="long",
                              params=SamplingParams(max_tokens=200, ignore_eos=True))
    outs, done = collect(loop, req)
    while len(outs) < 3:
        done.wait(0.01)
    assert loop.abort("long").result(timeout=10)
    n = len(outs)
    loop.call(lambda: None).result(timeout=10)  # a full loop turn later
    assert len(outs) == n and not outs[-1].finished
    assert loop.stats().result()["used_pages"] == 0


def test_errors_come_back_through_the_future(loop):
    with pytest.raises(KeyError):
        loop.adopt("nobody", 5, None, lambda out: None).result(timeout=10)


def test_stopped_loop_refuses_work(default_model):
    lp = EngineLoop(Engine(loaded=default_model, num_pages=16)).start()
    lp.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        lp.call(lambda: 1).result(timeout=10)
