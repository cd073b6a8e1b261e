"""Decode-side reuse without processes (issue 12 item 2).

Runtime: with `cache_adopted`, an ADOPTED request's hold takes (pins) the cached prefix
and allocates only the rest; adopt puts its prompt pages in the tree, finishing keeps its
prompt + generated pages; every ending unpins exactly once; pinned pages are never
evicted; a real prefill/decode engine pair copying only the pages after the decode's
prefix decodes the same greedy tokens as one engine without a cache.
Protocol (fakes, the two room machines wired together): the decode's Transfer names only
the pages after its cached prefix; the prefill writes and checksums only those, the
decode lands and checks only those; a wrong page count fails the room, pages freed once.
"""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize

from disagg_fakes import crc, settle, target
from pdmesh import Engine, SamplingParams
from pdmesh.disagg.ports import Code
from pdmesh.runtime.allocator import PageAllocator
from pdmesh.runtime.prefix_cache import PrefixCache
from test_engine_pd import prefill_only
from pdmesh.runtime.request import Mode, Request, Status
from pdmesh.runtime.scheduler import Scheduler
from pdmesh.worker.aio_engine import HeldPages
from test_disagg_integrity import RID, ROOM, Pair, _outcome
from test_prefix_cache import CachedSchedulerMachine

PS = 4  # tokens per page


# -- runtime: the scheduler's tree pinning ------------------------------------------------
def sched(num_pages: int = 16, adopted: bool = True) -> Scheduler:
    alloc = PageAllocator(num_pages)
    return Scheduler(alloc, PS, 8, 64, 64, cache=PrefixCache(alloc, PS), cache_adopted=adopted)


def adopted(rid: str, prompt: list[int], max_tokens: int = 8) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens), mode=Mode.ADOPTED)


def check(s: Scheduler) -> None:
    s.allocator.check()
    s.cache.check()


def decode_turn(s: Scheduler, prompt: list[int], outputs: list[int], rid: str) -> Request:
    """Hold, adopt and decode `outputs` (the first one "sampled by the prefill"), then
    finish: what a decode worker does for one PD request."""
    req = adopted(rid, prompt)
    assert s.hold_for_adopt(req) is not None
    s.adopt(req)
    req.output_ids.append(outputs[0])
    for t in outputs[1:]:
        batch = s.schedule()
        assert batch.kind == "decode"
        s.computed(batch)
        req.output_ids.append(t)
    s.finish(req, "stop")
    check(s)
    return req


def test_finished_adopted_kv_is_cached_and_the_next_hold_pins_only_its_prefix():
    s = sched()
    turn1 = list(range(100, 110))  # 10 tokens: 2 full pages + 2 tokens
    decode_turn(s, turn1, [200, 201, 202, 203, 204], "t1")
    # computed: 10 prompt + 4 of 5 outputs (the last one's KV is never written) = 14
    assert s.cache.num_pages == 3 and s.cache.num_evictable == 3
    assert s.reclaimable_pages == 16  # every page back: free or evictable
    turn2 = turn1 + [200, 201, 202, 203] + [300, 301, 302, 303, 304]  # 18 tokens, 5 pages
    req = adopted("t2", turn2)
    pages = s.hold_for_adopt(req)
    assert len(pages) == 5 and req.cached_tokens == 3 * PS
    assert [n.ref for n in req.cache_nodes] == [1, 1, 1]  # pinned
    assert s.cache.num_evictable == 0 and pages[:3] == [n.page for n in req.cache_nodes]
    check(s)
    s.finish(req, "abort")  # the transfer never came: unpinned, nothing new cached
    assert s.cache.num_pages == 3 and s.cache.num_evictable == 3
    assert s.reclaimable_pages == 16
    check(s)


def test_at_least_the_last_prompt_page_is_always_sent():
    s = sched()
    prompt = list(range(8))  # exactly 2 pages
    decode_turn(s, prompt, [50, 51, 52, 53, 54], "a")
    req = adopted("b", prompt)  # the same prompt: its 2 pages are cached
    assert len(s.hold_for_adopt(req)) == 2 and req.cached_tokens == PS  # never page 2
    s.finish(req, "abort")
    check(s)


def test_pinned_prefix_is_never_evicted_and_adopt_shares_the_prompt():
    s = sched(num_pages=8)
    decode_turn(s, list(range(12)), [90, 91], "a")  # 12 + 1 computed: 3 cached pages
    req = adopted("b", list(range(12)) + [7, 7], max_tokens=1)  # 3 cached + 1 new page
    assert len(s.hold_for_adopt(req)) == 4 and req.cached_tokens == 12
    big = adopted("c", list(range(500, 520)), max_tokens=1)  # 5 pages; 4 are free
    assert s.hold_for_adopt(big) is None  # the pinned pages are not evictable
    s.adopt(req)  # its prompt's full pages are in the tree now (3 matched, none new)
    assert s.cache.num_pages == 3 and [n.ref for n in req.cache_nodes] == [1, 1, 1]
    other = adopted("d", list(range(12)) + [7, 7, 1], max_tokens=1)  # pins b's pages too
    assert s.hold_for_adopt(other) is not None and other.cached_tokens == 12
    assert [n.ref for n in other.cache_nodes] == [2, 2, 2]
    for r in (other, req):
        s.finish(r, "abort")
    assert s.reclaimable_pages == 8 and s.cache.num_evictable == s.cache.num_pages
    check(s)


def test_without_cache_adopted_nothing_is_cached():
    s = sched(adopted=False)
    decode_turn(s, list(range(10)), [1, 2, 3, 4, 5], "a")
    req = adopted("b", list(range(10)) + [1, 2, 3, 4])
    s.hold_for_adopt(req)
    assert s.cache.num_pages == 0 and req.cached_tokens == 0 and req.status is Status.HELD
    s.finish(req, "abort")
    assert s.allocator.num_free == 16
    check(s)


def test_retracted_adopted_request_keeps_its_kv_cached():
    s = sched()
    req = adopted("a", list(range(10)))
    s.hold_for_adopt(req)
    s.adopt(req)
    req.output_ids.append(1)
    s.retract(req)  # computed: the 10 prompt tokens (2 full pages already in the tree)
    assert req.mode is Mode.GENERATE and s.cache.num_evictable == 2
    assert s.lookup(req) and len(s.lookup(req)) == 2  # its recompute starts after them
    check(s)


class AdoptedCachedMachine(CachedSchedulerMachine):
    """test_prefix_cache's scheduler machine (GENERATE, PREFILL_ONLY and ADOPTED requests
    over shared prefixes; holds, adopts, retractions, aborts in any state) with adopted KV
    cached: no page leaks or is freed while referenced, shared pages hold the tokens of
    every request using them, and every page comes back at the end."""

    @initialize(num_pages=st.integers(8, 64), page_size=st.integers(1, 8),
                max_running=st.integers(1, 8), max_prefill=st.integers(1, 64),
                chunk=st.integers(1, 48))
    def setup(self, num_pages, page_size, max_running, max_prefill, chunk):
        super().setup(num_pages, page_size, max_running, max_prefill, chunk)
        self.s.cache_adopted = True


AdoptedCachedMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None, report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestAdoptedCachedMachine = AdoptedCachedMachine.TestCase


# -- runtime: exactness with a real model -------------------------------------------------
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def test_pd_pair_sending_only_new_pages_equals_one_engine(default_model):
    """Turn 1 and turn 2 (turn 1's prompt + reply + more) through a prefill engine and a
    decode engine with decode reuse; only dst pages after the decode's cached prefix get
    the prefill's KV (the rest stay as the decode has them): the tokens of an engine
    without any cache."""
    ref = Engine(loaded=default_model, num_threads=1, page_size=8, num_pages=64,
                 prefix_cache=False)
    pre = Engine(loaded=default_model, num_threads=1, page_size=8, num_pages=64)
    dec = Engine(loaded=default_model, num_threads=1, page_size=8, num_pages=64)
    turn1 = ref.tokenizer.encode("The harbour at dawn was quiet, and the fishing boats")
    want1 = ref.generate(prompt_token_ids=turn1, params=GREEDY)[0].token_ids
    turn2 = turn1 + want1 + ref.tokenizer.encode(" Later that morning, the market")
    want2 = ref.generate(prompt_token_ids=turn2, params=GREEDY)[0].token_ids
    for i, (ids, want) in enumerate([(turn1, want1), (turn2, want2)]):
        rid = f"t{i}"
        first = prefill_only(pre, ids, rid, GREEDY)
        req = dec.make_request(prompt_token_ids=ids, params=GREEDY, request_id=rid,
                               mode=Mode.ADOPTED)
        dst = dec.hold(req)
        k = req.cached_tokens // 8
        assert k == (0 if i == 0 else (len(turn1) + len(want1) - 1) // 8)
        dec.runner.kv[dst[k:]] = pre.runner.kv[first.pages[k:]]  # the transfer
        pre.release(rid)
        outs = [dec.adopt(rid, first.token_ids[0])]
        while not outs[-1].finished:
            outs += [o for o in dec.step() if o.request_id == rid]
        assert outs[-1].token_ids == want
    s = dec.stats()
    assert s["free_pages"] == 64 and s["cached_pages"] > 0 and s["cache_hit_pages"] > 0


# -- protocol: the two room machines with fakes -------------------------------------------
SRC = (3, 4, 5)  # the room's 3 prompt pages on the prefill
HELD = (10, 11, 12)  # on the decode: 10, 11 cached already, 12 to write


async def _run(pair: Pair, held, prompt_pages=SRC) -> tuple[object, object, list[int]]:
    tokens: list[int] = []

    async def decode():
        async for outs, _ in pair.dec.generate(ROOM, "prefill:1", [1, 2, 3, 4, 5], None):
            tokens.extend(t for o in outs for t in o.token_ids)
            if RID in pair.deng.adopted and len(tokens) == 1:
                pair.deng.decode(RID, 8, finished=True)

    pre = asyncio.ensure_future(pair.pre.prefill(ROOM, "decode:1", [1, 2, 3, 4, 5], None))
    dec = asyncio.ensure_future(decode())
    await settle()
    pair.peng.prefill_done(RID, token=7, pages=prompt_pages)
    pair.deng.holds[RID].set_result(held)
    out = [await _outcome(pre), await _outcome(dec)]
    await asyncio.sleep(0.05)
    return out[0], out[1], tokens


def run_pair(held, prompt_pages=SRC):
    async def main():
        pair = Pair()
        seen = []
        transfer = pair.dec.peers.transfer

        async def spy(address, room, tgt, timeout):
            seen.append(tgt)
            return await transfer(address, room, tgt, timeout)
        pair.dec.peers.transfer = spy
        return (pair, seen, *await _run(pair, held, prompt_pages))
    return asyncio.run(asyncio.wait_for(main(), 30))


def test_only_the_pages_after_the_decode_prefix_are_sent_landed_and_checked():
    pair, seen, pre, dec, tokens = run_pair(HeldPages(list(HELD), cached_pages=2))
    assert (pre, dec, tokens) == ("ok", "ok", [7, 8])
    assert [(t.page_ids, t.cached_pages) for t in seen] == [((12,), 2)]
    assert pair.writer.writes == [([5], (12,))]  # one page written, the last one
    assert pair.receiver.landed == [[12]]  # the cached pages are never landed over
    assert set(pair.writer.dst) == {12} and pair.writer.dst[12] == pair.writer.src[5]
    assert pair.deng.adopted == [RID] and pair.peng.released == [RID]
    assert pair.deng.freed(RID) == 0  # finished by the engine: it frees (and caches) them


def test_no_cached_prefix_sends_every_page():
    pair, seen, pre, dec, tokens = run_pair(HeldPages(list(HELD)))
    assert (pre, dec) == ("ok", "ok") and [t.cached_pages for t in seen] == [0]
    assert pair.writer.writes == [(list(SRC), HELD)]


def test_checksum_covers_only_the_pages_sent():
    pair, _, pre, dec, _ = run_pair(HeldPages(list(HELD), cached_pages=2))
    assert (pre, dec) == ("ok", "ok")
    # the prefill's checksum of the pages it sent equals the decode's of what it got
    assert crc(pair.writer.src, [5]) == crc(pair.writer.dst, [12])


@pytest.mark.parametrize("cached", [3, 4])
def test_decode_prefix_covering_the_whole_prompt_is_refused(cached):
    """The decode never caches the last prompt token's page: a Transfer claiming every
    page is a bug; the room fails on both sides (INVALID_ARGUMENT), pages freed once."""
    held = HeldPages(list(HELD) + [13], cached_pages=cached)
    pair, _, pre, dec, tokens = run_pair(held)
    assert pre.code is Code.INVALID_ARGUMENT and dec.code is Code.INVALID_ARGUMENT
    assert "cached pages must be fewer" in pre.message and tokens == []
    assert pair.peng.freed(RID) == 1 and pair.deng.freed(RID) == 1
    assert pair.writer.writes == [] and not pair.dec.rooms and not pair.pre.rooms


def test_page_count_mismatch_after_the_prefix_is_refused():
    pair, _, pre, dec, _ = run_pair(HeldPages([10, 11, 12, 13], cached_pages=2))
    assert pre.code is Code.INVALID_ARGUMENT and "want 1" in pre.message
    assert pair.peng.freed(RID) == 1 and pair.deng.freed(RID) == 1
    assert pair.dec.quarantine.pages == 0


def test_a_prefill_transfer_target_from_the_proto():
    """The Transfer message carries the count (services/prefill/server.py `_target`)."""
    from pdmesh.services.prefill.server import _target
    from pdmesh.v1 import prefill_pb2 as ppb
    t = _target(ppb.TransferRequest(room=1, dst_page_ids=[12], dst_cached_pages=2,
                                    page_size=16, num_layers=2, num_kv_heads=1, head_dim=8,
                                    bytes_per_page=1024))
    assert t.page_ids == (12,) and t.cached_pages == 2
    assert target().cached_pages == 0


def test_cancelled_mid_transfer_quarantines_only_the_pages_being_written():
    """The client leaves while the prefill may be writing: the pages sent are quarantined
    (the cached prefix is never written); the prefill's confirmed abort then frees the
    request, pinned prefix included, once."""
    from disagg_fakes import FakeEngine, FakePeers
    from pdmesh.disagg.decode import DecodeProtocol

    async def main():
        eng, peers = FakeEngine(), FakePeers()
        proto = DecodeProtocol(eng, peers, None, lambda pages: target(pages), 5.0)
        proto.quarantine._retry_s = 0.01

        async def consume():
            async for _ in proto.generate(ROOM, "prefill:1", [1, 2, 3, 4, 5], None):
                pass
        task = asyncio.ensure_future(consume())
        await settle()
        eng.holds[RID].set_result(HeldPages([10, 11, 12], cached_pages=2))
        await settle()
        assert ROOM in peers.calls
        peers.abort_ok = False  # the prefill can't confirm yet
        task.cancel()
        await settle()
        quarantined, freed = proto.quarantine.pages, eng.freed(RID)
        peers.abort_ok = True
        await asyncio.sleep(0.1)  # the quarantine's retry: confirmed
        return eng, peers, quarantined, freed, proto.quarantine.pages
    eng, peers, quarantined, freed, after = asyncio.run(asyncio.wait_for(main(), 30))
    assert (quarantined, freed) == (1, 0) and after == 0
    assert ROOM in peers.aborts and eng.freed(RID) == 1
