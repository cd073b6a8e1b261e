"""KV integrity through both room machines, wired together with the fakes: the decode's
Transfer calls the prefill's protocol directly, and the page bytes move between two dict
pools. A destination mismatch is rewritten once; a second one fails the room on both
sides (DATA_LOSS, pages freed); a mismatch on the decode is never adopted."""
from __future__ import annotations

import asyncio

from disagg_fakes import FakeEngine, FakeReceiver, FakeWriter, settle, target
from pdmesh.disagg.decode import DecodeProtocol
from pdmesh.disagg.ports import Code, RoomError
from pdmesh.disagg.prefill import PrefillProtocol

P, D = "prefill:1", "decode:1"
ROOM = 5
RID = str(ROOM)
SRC, DST = (3, 4), (10, 11)  # the room's pages on the prefill / on the decode


class LoopPeers:
    """PrefillPeers that call a PrefillProtocol in this process."""

    def __init__(self, prefill: PrefillProtocol) -> None:
        self.prefill, self.aborts = prefill, []

    async def transfer(self, address, room, tgt, timeout):
        return await self.prefill.transfer(room, tgt, timeout)

    async def abort(self, address, room, timeout):
        self.aborts.append(room)
        return await self.prefill.abort(room)


class Pair:
    """A prefill and a decode protocol sharing one room's KV pools."""

    def __init__(self) -> None:
        self.peng, self.deng = FakeEngine(), FakeEngine()
        self.writer = FakeWriter()
        self.writer.gate.set()
        self.receiver = FakeReceiver(self.writer.dst)
        self.events: list[str] = []
        self.pre = PrefillProtocol(self.peng, self.writer, 5.0, check_target=lambda t: None,
                                   page_size=2, on_integrity=self.events.append)
        self.dec = DecodeProtocol(self.deng, LoopPeers(self.pre), self.receiver,
                                  lambda pages: target(pages, room=ROOM), 5.0,
                                  on_integrity_failure=lambda: self.events.append("decode"))
        self.dec.quarantine._retry_s = 0.01

    async def run(self) -> tuple[object, object, list[int]]:
        """One room end to end; (prefill outcome, decode outcome, decoded tokens)."""
        tokens: list[int] = []

        async def decode():
            async for outs, _ in self.dec.generate(ROOM, P, [1, 2, 3], None):
                tokens.extend(t for o in outs for t in o.token_ids)
                if RID in self.deng.adopted and len(tokens) == 1:
                    self.deng.decode(RID, 8, finished=True)

        pre = asyncio.ensure_future(self.pre.prefill(ROOM, D, [1, 2, 3], None))
        dec = asyncio.ensure_future(decode())
        await settle()
        self.peng.prefill_done(RID, token=7, pages=SRC)
        self.deng.holds[RID].set_result(list(DST))
        results = [await _outcome(pre), await _outcome(dec)]
        await asyncio.sleep(0.05)  # a quarantine would confirm its abort by now
        return results[0], results[1], tokens

    def right_bytes(self) -> bool:
        return [self.writer.dst[d] for d in DST] == [self.writer.src[s] for s in SRC]


async def _outcome(task):
    try:
        await asyncio.wait_for(task, 5)
        return "ok"
    except RoomError as e:
        return e


def run_pair(setup) -> tuple[Pair, object, object, list[int]]:
    async def main():
        pair = Pair()
        setup(pair)
        return (pair, *await pair.run())
    return asyncio.run(asyncio.wait_for(main(), 30))


def test_clean_room_is_verified_on_both_sides():
    pair, pre, dec, tokens = run_pair(lambda p: None)
    assert (pre, dec, tokens) == ("ok", "ok", [7, 8]) and pair.right_bytes()
    assert pair.events == [] and pair.pre.counters.transferred == 1


def test_mismatch_once_is_rewritten_and_adopted_with_the_right_bytes():
    def corrupt_first_write(p):
        p.writer.corrupt = 1
    pair, pre, dec, tokens = run_pair(corrupt_first_write)
    assert (pre, dec, tokens) == ("ok", "ok", [7, 8])
    assert pair.right_bytes() and len(pair.writer.writes) == 2
    assert pair.events == ["retry"] and pair.pre.counters.integrity_retries == 1
    assert pair.deng.adopted == [RID] and pair.peng.released == [RID]


def test_mismatch_twice_fails_the_room_on_both_sides():
    def corrupt_always(p):
        p.writer.corrupt = 2
    pair, pre, dec, tokens = run_pair(corrupt_always)
    assert pre.code is Code.DATA_LOSS and dec.code is Code.DATA_LOSS and tokens == []
    assert "corrupted" in dec.message and "after a rewrite" in dec.message
    assert pair.events == ["retry", "failure"] and pair.pre.counters.integrity_failures == 1
    assert pair.deng.adopted == []  # never decoded from wrong KV
    assert pair.peng.freed(RID) == 1 and pair.peng.aborted == [RID]  # prefill pages freed
    assert pair.deng.freed(RID) == 1 and pair.dec.quarantine.pages == 0  # decode's too
    assert not pair.pre.rooms and not pair.dec.rooms


def test_decode_mismatch_is_never_adopted():
    def bad_land(p):  # the bytes change after the prefill's check (e.g. a bad land)
        land = p.receiver.land

        async def corrupting_land(pages, path):
            await land(pages, path)
            p.writer.dst[pages[-1]] = b"stale page"
        p.receiver.land = corrupting_land
    pair, pre, dec, tokens = run_pair(bad_land)
    assert pre == "ok"  # the prefill's own check passed
    assert dec.code is Code.DATA_LOSS and "not adopted" in dec.message and tokens == []
    assert pair.events == ["decode"] and pair.dec.counters.integrity_failures == 1
    assert pair.deng.adopted == [] and pair.deng.freed(RID) == 1
    assert pair.dec.quarantine.pages == 0 and not pair.dec.rooms


def test_checksums_off_lets_corruption_through():
    """Proves the checks are what catch it: with the prefill's off, the decode adopts
    corrupted pages (it has no checksum to compare with)."""
    def off(p):
        p.writer.checksums, p.writer.corrupt = False, 1
    pair, pre, dec, tokens = run_pair(off)
    assert (pre, dec, tokens) == ("ok", "ok", [7, 8]) and not pair.right_bytes()
    assert pair.events == []


def test_decode_checks_off_adopts_without_reading():
    def decode_off(p):
        p.receiver.checksums = False
        p.receiver.land = _stale_land(p)
    pair, pre, dec, tokens = run_pair(decode_off)
    assert (pre, dec, tokens) == ("ok", "ok", [7, 8]) and pair.events == []


def _stale_land(p):
    async def land(pages, path):
        p.writer.dst[pages[0]] = b"stale"
    return land
