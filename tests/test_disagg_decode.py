"""DecodeProtocol with fakes: every room state x {prefill dies, client cancels, timeout}.
Pages are given back exactly once; pages a prefill may still be writing are quarantined
until it confirms the abort or is gone, never reused before."""
from __future__ import annotations

import asyncio

import pytest

from disagg_fakes import FakeEngine, FakeLiveness, FakePeers, settle
from pdmesh.disagg.decode import DecodeProtocol
from pdmesh.disagg.ports import Code, RoomError

P = "prefill:1"
ROOM = 7
RID = str(ROOM)
BLAMES: list[str] = []  # RoomError.blame of each failed consume(), since make()


def make(waiting: float = 5.0, retry_s: float = 0.05):
    eng, peers, live = FakeEngine(), FakePeers(), FakeLiveness()
    BLAMES.clear()
    proto = DecodeProtocol(eng, peers, None, lambda pages: ("target", tuple(pages)),
                           waiting, liveness=live)
    proto.quarantine._retry_s = retry_s
    return proto, eng, peers, live


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def consume(proto, room=ROOM, address=P) -> tuple[list[int], Code | str]:
    toks = []
    try:
        async for outs, _ in proto.generate(room, address, [1, 2, 3], None):
            toks += [t for o in outs for t in o.token_ids]
        return toks, "ok"
    except RoomError as e:
        BLAMES.append(e.blame)
        return toks, e.code


async def to_state(state: str, waiting: float = 5.0):
    proto, eng, peers, live = make(waiting)
    task = asyncio.ensure_future(consume(proto))
    await settle()
    if state in ("transfer_sent", "decoding"):
        eng.holds[RID].set_result([4, 5])
        await settle()
        assert ROOM in peers.calls
    if state == "decoding":
        peers.reply(ROOM, token=9)
        await settle()
        assert proto.rooms[ROOM].kv_done
    return proto, eng, peers, live, task


@pytest.mark.parametrize("state", ["prealloc", "transfer_sent", "decoding"])
def test_prefill_dies(state):
    async def main():
        proto, eng, peers, live, task = await to_state(state)
        live.gone.add(P)
        proto.peer_gone(P, "EXPIRED")
        await settle()
        if state == "decoding":  # the KV is here: decoding goes on
            eng.decode(RID, 10, finished=True)
        return proto, eng, peers, await task
    proto, eng, peers, (toks, code) = run(main())
    if state == "decoding":
        assert (toks, code) == ([9, 10], "ok") and eng.freed(RID) == 0  # engine freed it
    else:
        assert code is Code.UNAVAILABLE and eng.freed(RID) == 1
        assert BLAMES == ["prefill"]  # the gateway retries away from the prefill
    assert not proto.rooms and len(proto.quarantine) == 0
    if state == "transfer_sent":
        assert peers.cancelled == [ROOM] and not peers.aborts  # gone: no Abort needed


@pytest.mark.parametrize("state", ["prealloc", "transfer_sent", "decoding"])
@pytest.mark.parametrize("confirmed", [True, False])
def test_client_cancels(state, confirmed):
    async def main():
        proto, eng, peers, live, task = await to_state(state)
        peers.abort_ok = confirmed
        task.cancel()
        await settle()
        quarantined = len(proto.quarantine)
        await asyncio.sleep(0.2)  # a few quarantine retries
        still = len(proto.quarantine)
        live.gone.add(P)
        proto.peer_gone(P, "EXPIRED")  # the lease ends: quarantined pages are free
        await settle()
        return proto, eng, peers, quarantined, still
    proto, eng, peers, quarantined, still = run(main())
    assert eng.freed(RID) == 1 and not proto.rooms and len(proto.quarantine) == 0
    if state == "transfer_sent":
        assert ROOM in peers.aborts  # freed only after the prefill was asked to confirm
        assert still == (0 if confirmed else 1) and (confirmed or quarantined == 1)
    else:
        assert quarantined == 0 and not peers.aborts


@pytest.mark.parametrize("state", ["prealloc", "transfer_sent"])
def test_waiting_timeout(state):
    async def main():
        proto, eng, peers, live, task = await to_state(state, waiting=0.3)
        res = await task
        await asyncio.sleep(0.1)
        return proto, eng, peers, res
    proto, eng, peers, (toks, code) = run(main())
    assert code is Code.DEADLINE_EXCEEDED and proto.counters.waiting_timeouts == 1
    assert eng.freed(RID) == 1 and len(proto.quarantine) == 0
    assert (ROOM in peers.aborts) == (state == "transfer_sent")  # confirmed before reuse


@pytest.mark.parametrize("code, want", [(Code.INVALID_ARGUMENT, Code.INVALID_ARGUMENT),
                                        (Code.NOT_FOUND, Code.UNAVAILABLE),
                                        (Code.INTERNAL, Code.UNAVAILABLE)])
def test_prefill_error_codes(code, want):
    async def main():
        proto, eng, peers, live, task = await to_state("transfer_sent")
        peers.error(ROOM, code)
        return eng, await task
    eng, (toks, got) = run(main())
    assert got is want and eng.freed(RID) == 1
    # the prefill's own verdict on the request (INVALID_ARGUMENT) is no prefill fault
    assert BLAMES == ["prefill" if want is Code.UNAVAILABLE else ""]


def test_abort_rpc_ends_a_decoding_stream_and_frees_once():
    async def main():
        proto, eng, peers, live, task = await to_state("decoding")
        assert proto.abort(ROOM) and not proto.abort(999)
        return eng, await task
    eng, (toks, code) = run(main())
    assert code is Code.CANCELLED and eng.freed(RID) == 1


def test_colocated_and_duplicate_room():
    async def main():
        proto, eng, peers, live = make()
        task = asyncio.ensure_future(consume(proto, address=""))
        await settle()
        with pytest.raises(RoomError) as dup:
            async for _ in proto.generate(ROOM, "", [1], None):
                pass
        eng.decode(RID, 5)
        eng.decode(RID, 6, finished=True)
        return eng, proto, dup.value.code, await task
    eng, proto, dup, (toks, code) = run(main())
    assert dup is Code.ALREADY_EXISTS and (toks, code) == ([5, 6], "ok")
    assert eng.added == [RID] and proto.counters.finished == 1 and eng.freed(RID) == 0


def test_prefill_already_gone_fails_at_once():
    async def main():
        proto, eng, peers, live = make()
        live.gone.add(P)
        return eng, await consume(proto)
    eng, (toks, code) = run(main())
    assert code is Code.UNAVAILABLE and eng.freed(RID) == 1 and BLAMES == ["prefill"]


def test_stream_interval_coalesces_after_the_first_token():
    """stream_interval 3: token 1 alone (TTFT), then messages of >= 3 tokens, and the
    last message whatever is left when the request finishes."""
    async def main():
        proto, eng, peers, live = make()
        proto.stream_interval = 3
        msgs = []

        async def consume_msgs():
            async for outs, _ in proto.generate(ROOM, "", [1, 2, 3], None):
                msgs.append([t for o in outs for t in o.new_token_ids])
        task = asyncio.ensure_future(consume_msgs())
        await settle()
        for tok in range(1, 7):
            eng.decode(RID, tok, finished=tok == 6)
            await settle()
        await task
        return msgs
    assert run(main()) == [[1], [2, 3, 4], [5, 6]]


def test_engine_failure_ends_the_stream_unavailable():
    """The engine fails under a decoding room (its stream closes with the engine's
    error): the caller gets UNAVAILABLE (the gateway may retry elsewhere), not UNKNOWN."""
    async def main():
        proto, eng, peers, live = make()
        task = asyncio.ensure_future(consume(proto, address=""))
        await settle()
        eng.decode(RID, 5)
        await settle()
        eng.streams[RID].close(RuntimeError("the engine failed (Boom: gone)"))
        return await task
    toks, code = run(main())
    assert (toks, code) == ([5], Code.UNAVAILABLE)
