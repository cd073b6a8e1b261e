"""Admission at the gateway (services/gateway/admission.py).

Unit tests of the limiter (plain asyncio), then the gateway end to end over the fakes of
tests/gateway_fakes.py (a real registry and real `pdmesh gateway` processes, as in
tests/test_gateway_load.py): at 4x overload the excess gets 429 + Retry-After (REST) and
RESOURCE_EXHAUSTED + retry-after (gRPC), the admitted requests complete, and the
`openai` client's own retries get every request through a small limit.
"""
from __future__ import annotations

import asyncio
import logging

import pytest

from pdmesh.services.gateway.admission import QUEUE_FULL, QUEUE_TIMEOUT, Admission, Rejected
from pdmesh.telemetry.metrics import GatewayMetrics


def run(coro):
    return asyncio.run(coro)


async def _settle():
    """Let every ready task run up to its next wait."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_limit_then_queue_then_reject():
    async def main():
        adm = Admission(max_inflight=2, max_queued=1, queue_timeout_s=5)
        await adm.acquire(), await adm.acquire()
        waiter = asyncio.ensure_future(adm.acquire())
        await _settle()
        assert (adm.inflight, adm.queued, waiter.done()) == (2, 1, False)
        with pytest.raises(Rejected) as e:
            await adm.acquire()
        assert e.value.reason == QUEUE_FULL and 0.5 <= e.value.retry_after_s <= 1.5
        adm.release()  # the slot goes to the waiter
        await waiter
        assert (adm.inflight, adm.queued) == (2, 0)
        adm.release(), adm.release()
        assert (adm.inflight, adm.queued) == (0, 0)
        adm.close()
    run(main())


def test_waiters_are_served_in_arrival_order():
    async def main():
        adm, order = Admission(max_inflight=1, max_queued=10, queue_timeout_s=5), []
        await adm.acquire()

        async def one(i):
            async with adm.slot():
                order.append(i)
                await asyncio.sleep(0.001)
        tasks = []
        for i in range(10):
            tasks.append(asyncio.ensure_future(one(i)))
            await _settle()  # queued one after another
        assert adm.queued == 10
        adm.release()
        await asyncio.gather(*tasks)
        assert order == list(range(10)) and (adm.inflight, adm.queued) == (0, 0)
    run(main())


def test_queue_timeout_rejects_and_frees_the_place():
    async def main():
        metrics = GatewayMetrics()
        adm = Admission(max_inflight=1, max_queued=2, queue_timeout_s=0.05, metrics=metrics)
        await adm.acquire()
        with pytest.raises(Rejected) as e:
            await adm.acquire()
        assert e.value.reason == QUEUE_TIMEOUT and adm.queued == 0
        assert metrics.admission_rejected.labels(QUEUE_TIMEOUT)._value.get() == 1
        adm.release()
        assert (adm.inflight, adm.queued) == (0, 0)
        assert metrics.admission_inflight._value.get() == metrics.admission_queued._value.get() == 0
        adm.close()
    run(main())


def test_cancel_while_queued_leaves_the_queue():
    async def main():
        adm = Admission(max_inflight=1, max_queued=5, queue_timeout_s=0)  # 0: no timeout
        await adm.acquire()
        gone = asyncio.ensure_future(adm.acquire())
        stays = asyncio.ensure_future(adm.acquire())
        await _settle()
        gone.cancel()  # its client went away
        await _settle()
        assert adm.queued == 1
        adm.release()
        await stays  # skipped the cancelled one
        assert (adm.inflight, adm.queued) == (1, 0)
        adm.release()
        assert adm.inflight == 0
    run(main())


def test_a_slot_handed_to_a_cancelled_waiter_is_passed_on():
    async def main():
        adm = Admission(max_inflight=1, max_queued=5, queue_timeout_s=5)
        await adm.acquire()
        first = asyncio.ensure_future(adm.acquire())
        second = asyncio.ensure_future(adm.acquire())
        await _settle()
        adm.release()  # hands the slot to `first`...
        first.cancel()  # ...which is cancelled before it runs again
        await _settle()
        assert first.cancelled() and second.done()
        assert (adm.inflight, adm.queued) == (1, 0)
        adm.release()
        assert adm.inflight == 0
        adm.close()
    run(main())


def test_no_limit_counts_but_never_waits():
    async def main():
        adm = Admission()  # max_inflight 0
        for _ in range(1000):
            await adm.acquire()
        assert (adm.inflight, adm.queued) == (1000, 0)
        for _ in range(1000):
            adm.release()
        assert adm.inflight == 0
    run(main())


def test_rejecting_logs_once_when_it_starts_and_once_when_it_stops(caplog, monkeypatch):
    import pdmesh.services.gateway.admission as admission
    monkeypatch.setattr(admission, "_QUIET_S", 0.05)

    async def main():
        adm = Admission(max_inflight=1, max_queued=0, retry_after_s=2)
        await adm.acquire()
        for _ in range(20):
            with pytest.raises(Rejected) as e:
                await adm.acquire()
        assert dict(e.value.retry_headers())["retry-after"] in ("1", "2", "3")
        assert 1000 <= int(dict(e.value.retry_headers())["retry-after-ms"]) <= 3000
        await asyncio.sleep(0.2)
        adm.release()
    with caplog.at_level(logging.WARNING, logger=admission.__name__):
        run(main())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "rejecting requests" in lines[0] and "stopped rejecting (20 rejected" in lines[1]


def test_bad_limits_are_refused():
    with pytest.raises(ValueError):
        Admission(max_inflight=-1)
    with pytest.raises(ValueError):
        Admission(retry_after_s=0)
