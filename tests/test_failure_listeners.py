"""The engine's failure listeners (pdmesh/worker/failure.py, AsyncEngine): every part of
a worker that reacts to its engine failing adds its own listener; each is called once,
one that raises does not keep the others from hearing, and the failure is reported once
however often the engine side says it. Unit tests of one layer: the engine core is a
stand-in with EngineProcess's `bind` interface."""
from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

from pdmesh.worker.aio_engine import AsyncEngine
from pdmesh.worker.failure import FailureListeners
from pdmesh.worker.streams import EngineFailed


class _Process:
    """EngineProcess's face towards AsyncEngine: `info` and `bind`; keeps the failure
    callback so the test can fail the engine."""

    info = SimpleNamespace(engine_config=None, model_config=None, tokenizer=None)

    def bind(self, on_events, on_failure):
        self.on_failure = on_failure
        return SimpleNamespace(submit=lambda cmd: None, stop=lambda: None)


def test_two_listeners_one_raising_both_called_failure_reported_once(caplog):
    async def main():
        proc = _Process()
        eng = AsyncEngine(process=proc)
        heard: list[tuple[str, BaseException]] = []

        def broken(error):
            heard.append(("broken", error))
            raise RuntimeError("listener bug")
        eng.add_failure_listener(broken)
        eng.add_failure_listener(lambda error: heard.append(("second", error)))
        stream = eng._open("r1", 1)  # an open stream ends with the failure
        boom = OSError("rank 1 died")
        proc.on_failure(boom)
        proc.on_failure(OSError("again"))  # a second report: nobody is told twice
        with pytest.raises(EngineFailed, match="rank 1 died"):
            await stream.next_batch()
        return heard, boom
    with caplog.at_level(logging.ERROR, logger="pdmesh.worker.failure"):
        heard, boom = asyncio.run(main())
    assert heard == [("broken", boom), ("second", boom)]
    assert "listener bug" in caplog.text  # logged with its traceback, not swallowed


def test_a_listener_added_after_the_failure_hears_it_at_once():
    listeners = FailureListeners()
    first: list[BaseException] = []
    listeners.add(first.append)
    err = RuntimeError("engine loop failed")
    assert listeners.notify(err) and not listeners.notify(RuntimeError("later"))
    late: list[BaseException] = []
    listeners.add(late.append)
    assert first == [err] and late == [err] and listeners.error is err
