"""PrefillProtocol with fakes: every room state x {decode dies, caller cancels, timeout},
plus the compute-ahead budget. In every case the room's pages are given back exactly
once, the callers get the right code, and `abort` never returns while a write runs."""
from __future__ import annotations

import asyncio

import pytest

from disagg_fakes import FakeEngine, FakeWriter, settle, target
from pdmesh.disagg.ports import Code, RoomError
from pdmesh.disagg.prefill import PrefillProtocol, State

D = "decode:1"
ROOM = 42


def make(bootstrap: float = 5.0, ahead: int | None = None):
    eng, writer = FakeEngine(), FakeWriter()
    proto = PrefillProtocol(eng, writer, bootstrap, check_target=lambda t: None,
                            page_size=2, ahead_pages=ahead)
    return proto, eng, writer


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def start_prefill(proto, room=ROOM, ids=(1, 2, 3)):
    task = asyncio.ensure_future(proto.prefill(room, D, list(ids), None))
    await settle()
    return task


async def to_state(state: str):
    """A protocol with one room driven to `state`; returns (proto, eng, writer, tasks)."""
    limit = 0.5 if state != "writing" else 5.0  # bootstrap timeout and Transfer deadline
    # "deferred": the compute-ahead budget (1 page) is smaller than the prompt (2 pages)
    proto, eng, writer = make(bootstrap=limit, ahead=1 if state == "deferred" else None)
    tasks = {"prefill": await start_prefill(proto)}
    if state == "deferred":
        assert proto.deferred_rooms == 1 and not eng.added
    if state in ("computed", "transfer_waiting_kv", "writing"):
        if state != "transfer_waiting_kv":
            eng.prefill_done(str(ROOM))
        await settle()
    if state in ("transfer_waiting_kv", "writing"):
        tasks["transfer"] = asyncio.ensure_future(proto.transfer(ROOM, target(), limit))
        await settle()
    if state == "transfer_waiting_kv":
        assert proto.rooms[ROOM].state is State.PENDING and proto.rooms[ROOM].first is None
    if state == "writing":
        assert proto.rooms[ROOM].state is State.WRITING and writer.in_flight == 1
    return proto, eng, writer, tasks


STATES = ["deferred", "queued", "computed", "transfer_waiting_kv", "writing"]


async def outcome(task) -> Code | str:
    try:
        await asyncio.wait_for(task, 5)
        return "ok"
    except RoomError as e:
        return e.code
    except asyncio.CancelledError:
        return "cancelled"


@pytest.mark.parametrize("state", STATES)
def test_decode_dies(state):
    async def main():
        proto, eng, writer, tasks = await to_state(state)
        proto.peer_gone(D, "EXPIRED")
        writer.gate.set()  # a write in flight finishes; its pages are then freed
        results = {k: await outcome(t) for k, t in tasks.items()}
        return proto, eng, writer, results, tasks["prefill"].exception().blame
    proto, eng, writer, results, blame = run(main())
    assert results["prefill"] is Code.UNAVAILABLE
    assert blame == "decode"  # the gateway retries away from the decode, not this prefill
    # a deferred room never reached the engine: nothing to free there
    assert eng.freed(str(ROOM)) == (0 if state == "deferred" else 1)
    assert not proto.rooms and proto.counters.failed == 1 and proto.ahead_pages == 0
    assert proto.deferred_rooms == 0


@pytest.mark.parametrize("state", STATES)
def test_caller_cancels(state):
    async def main():
        proto, eng, writer, tasks = await to_state(state)
        tasks["prefill"].cancel()
        await settle()
        aborted = asyncio.ensure_future(proto.abort(ROOM))
        await settle()
        in_flight_while_abort_waits = writer.in_flight and not aborted.done()
        writer.gate.set()
        results = {k: await outcome(t) for k, t in tasks.items()}
        return proto, eng, results, await aborted, in_flight_while_abort_waits, state
    proto, eng, results, aborted, waited, state = run(main())
    assert results["prefill"] == "cancelled"
    if "transfer" in results:
        assert results["transfer"] is Code.CANCELLED
    assert eng.freed(str(ROOM)) == (0 if state == "deferred" else 1)
    assert not proto.rooms and proto.ahead_pages == 0 and proto.deferred_rooms == 0
    assert waited == (state == "writing")  # abort waited for the write to end
    assert aborted == (state == "writing")  # else the cancel had ended the room already


@pytest.mark.parametrize("state", ["deferred", "queued", "computed", "transfer_waiting_kv"])
def test_timeout(state):
    """No Transfer within the bootstrap timeout, or no KV within the Transfer deadline."""
    async def main():
        proto, eng, writer, tasks = await to_state(state)
        results = {k: await outcome(t) for k, t in tasks.items()}
        return proto, eng, results
    proto, eng, results = run(main())
    assert results["prefill"] is Code.DEADLINE_EXCEEDED
    assert eng.freed(str(ROOM)) == (0 if state == "deferred" else 1) and not proto.rooms
    if state != "transfer_waiting_kv":
        assert proto.counters.bootstrap_timeouts == 1


def test_writing_fails_then_transfer_and_prefill_fail_once():
    async def main():
        proto, eng, writer, tasks = await to_state("writing")
        writer.fail = True
        writer.gate.set()
        return eng, {k: await outcome(t) for k, t in tasks.items()}
    eng, results = run(main())
    assert results == {"prefill": Code.INTERNAL, "transfer": Code.INTERNAL}
    assert eng.aborted == [str(ROOM)] and not eng.released


def test_happy_path_and_late_duplicates():
    async def main():
        proto, eng, writer, tasks = await to_state("writing")
        writer.gate.set()
        results = {k: await outcome(t) for k, t in tasks.items()}
        with pytest.raises(RoomError) as late:
            await proto.transfer(ROOM, target(), 1.0)
        with pytest.raises(RoomError) as again:
            await proto.prefill(ROOM, D, [1], None)
        return proto, eng, results, late.value.code, again.value.code
    proto, eng, results, late, again = run(main())
    assert results == {"prefill": "ok", "transfer": "ok"}
    assert eng.released == [str(ROOM)] and not eng.aborted
    assert (late, again) == (Code.NOT_FOUND, Code.CANCELLED)  # tombstoned
    assert proto.counters.transferred == 1


def test_transfer_first_then_prefill_and_page_count_mismatch():
    async def main():
        proto, eng, writer = make()
        t = asyncio.ensure_future(proto.transfer(ROOM, target(pages=(1, 2, 3)), 5.0))
        await settle()
        p = await start_prefill(proto)
        eng.prefill_done(str(ROOM), pages=(5, 6))
        return eng, await outcome(t), await outcome(p)
    eng, t, p = run(main())
    assert t is p is Code.INVALID_ARGUMENT and eng.aborted == [str(ROOM)]


def test_bad_prompt_is_invalid_argument_and_frees_nothing():
    async def main():
        proto, eng, _ = make()
        return proto, eng, await outcome(asyncio.ensure_future(proto.prefill(1, D, [-1], None)))
    proto, eng, code = run(main())
    assert code is Code.INVALID_ARGUMENT and not eng.added and not proto.rooms


def test_compute_ahead_budget_defers_rooms_until_their_transfer():
    """With the budget full, a room without a Transfer waits; its Transfer (or the
    budget freeing up) lets it compute. Rooms whose decode is ready never wait."""
    async def main():
        proto, eng, writer = make(ahead=2)  # page_size 2: a 3-token prompt takes 2 pages
        a = await start_prefill(proto, room=1)
        b = await start_prefill(proto, room=2)
        assert eng.added == ["1"] and proto.deferred_rooms == 1 and proto.ahead_pages == 2
        tb = asyncio.ensure_future(proto.transfer(2, target(room=2), 5.0))
        await settle()
        assert eng.added == ["1", "2"] and proto.deferred_rooms == 0
        c = await start_prefill(proto, room=3)
        assert eng.added == ["1", "2"]  # room 1 still holds the budget
        ta = asyncio.ensure_future(proto.transfer(1, target(room=1), 5.0))
        await settle()
        assert eng.added == ["1", "2", "3"] and proto.ahead_pages == 2
        for rid in ("1", "2", "3"):
            eng.prefill_done(rid)
        tc = asyncio.ensure_future(proto.transfer(3, target(room=3), 5.0))
        writer.gate.set()
        return [await outcome(x) for x in (a, b, c, ta, tb, tc)], proto
    results, proto = run(main())
    assert results == ["ok"] * 6 and proto.ahead_pages == 0 and proto.counters.deferred == 2


def test_engine_failure_fails_the_room_at_once():
    """The engine fails while the room computes: Prefill fails UNAVAILABLE now, not
    after the bootstrap timeout, and a Transfer for the room is refused."""
    async def main():
        proto, eng, writer = make(bootstrap=30.0)
        task = await start_prefill(proto)
        eng.streams[str(ROOM)].close(RuntimeError("the engine failed (Boom: gone)"))
        with pytest.raises(RoomError) as e:
            await asyncio.wait_for(task, 2)
        return proto, e.value
    proto, err = run(main())
    assert err.code is Code.UNAVAILABLE and "engine failed" in err.message
    assert ROOM not in proto.rooms
