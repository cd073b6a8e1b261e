"""MooncakeTransport's async writes (submit, then sleep-poll) and read_pages, over tcp
loopback into a pool served by a child process (pdmesh.transfer.peer), plus the wait
loop's behaviour against a scripted fake engine."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from pdmesh.transfer import TransferError, get_transport
from pdmesh.transfer import mooncake_transport as mt
from pdmesh.transfer.peer import SENTINEL, PoolPeer, make_pool, page_digest, tensor_page_digests

MooncakeTransport = get_transport("mooncake")
PAGE = (30, 16, 2, 3, 64)  # SmolLM2-135M: 737,280 bytes per page
NUM_PAGES = 64


def run_with_deadline(fn, seconds):
    """Run fn in a thread; fail if it is still running after `seconds`. Returns
    (result, exception, elapsed seconds)."""
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t0 = time.perf_counter()
    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(seconds)
    assert not th.is_alive(), f"call still running after {seconds} s"
    return box.get("result"), box.get("error"), time.perf_counter() - t0


@pytest.fixture(scope="module")
def local():
    t = MooncakeTransport()
    assert t.write_api == "async" and t.name == "mooncake"
    yield t
    t.close()


@pytest.fixture(scope="module")
def setup(local):
    """(source pool, its registered base, peer process serving a sentinel-filled pool)."""
    src = make_pool(NUM_PAGES, PAGE, seed=0)
    base = local.register(src)
    peer = PoolPeer.start(NUM_PAGES, PAGE)
    yield src, base, peer
    peer.stop()


def expected_digests(src, pairs):
    """Peer digests after writing src page s over peer page d for (s, d) in pairs."""
    sent = page_digest(bytes([SENTINEL]) * src[0].numel() * src.element_size())
    out = [sent] * NUM_PAGES
    src_d = tensor_page_digests(src)
    for s, d in pairs:
        out[d] = src_d[s]
    return out


# ---------------------------------------------------------------- writes

@pytest.mark.parametrize("src_pages,dst_pages", [
    ([7], [3]),
    (list(range(8, 16)), list(range(40, 48))),
    (list(range(0, 32)), list(range(32, 64))),
    ([1, 5, 9, 33, 2, 63, 20, 19], [60, 0, 7, 8, 9, 31, 45, 44]),  # scattered, reversed run
])
def test_async_write_lands_byte_for_byte(local, setup, src_pages, dst_pages):
    src, base, peer = setup
    peer.reset()
    bpp = peer.bytes_per_page
    stats = local.write_pages(peer.session_id, base, peer.base, bpp, src_pages, dst_pages)
    assert stats.bytes == len(src_pages) * bpp and stats.seconds > 0
    # every page: written ones hold the source, all others still the sentinel
    assert peer.digests() == expected_digests(src, zip(src_pages, dst_pages))
    # and the written bytes, read back, equal the source exactly
    got = local.read_pages(peer.session_id, peer.base, bpp, dst_pages)
    assert torch.equal(got, src.view(torch.uint8).reshape(NUM_PAGES, -1)[src_pages])


def test_sync_write_api_still_works(setup):
    src, base, peer = setup
    peer.reset()
    t = MooncakeTransport(write_api="sync")
    try:
        t.register(src)
        t.write_pages(peer.session_id, base, peer.base, peer.bytes_per_page, [0, 1, 5], [9, 10, 2])
        assert peer.digests() == expected_digests(src, [(0, 9), (1, 10), (5, 2)])
    finally:
        t.close()
    with pytest.raises(ValueError, match="write_api"):
        MooncakeTransport(write_api="spin")


def test_argument_checks_unchanged(local, setup):
    _, base, peer = setup
    with pytest.raises(ValueError, match="bytes_per_page"):
        local.write_pages(peer.session_id, base, peer.base, 0, [0], [0])
    with pytest.raises(ValueError, match="more than once"):
        local.write_pages(peer.session_id, base, peer.base, peer.bytes_per_page, [0, 1], [2, 2])
    with pytest.raises(ValueError, match="not in registered memory"):
        local.write_pages(peer.session_id, base, peer.base, peer.bytes_per_page,
                          [NUM_PAGES], [0])
    assert local.write_pages(peer.session_id, base, peer.base, 4096, [], []).bytes == 0


def test_destination_outside_peer_memory_raises(local, setup):
    _, base, peer = setup
    beyond = peer.base + NUM_PAGES * peer.bytes_per_page
    _, err, _ = run_with_deadline(lambda: local.write_pages(
        peer.session_id, base, beyond, peer.bytes_per_page, [0], [0]), 10)
    assert isinstance(err, TransferError) and err.rc != 0
    assert "batch_transfer_async_write" in str(err)


def test_unknown_session_raises_with_the_engine_code(local, setup):
    _, base, _ = setup
    _, err, _ = run_with_deadline(lambda: local.write_pages(
        "127.0.0.1:1", base, base, 4096, [0], [0]), 10)
    assert isinstance(err, TransferError) and err.rc == -1
    assert "127.0.0.1:1" in str(err)


def test_concurrent_writes_from_four_threads(local, setup):
    src, base, peer = setup
    peer.reset()
    perm = list(range(NUM_PAGES))
    perm = perm[16:] + perm[:16]  # page s goes to perm[s]
    quarters = [list(range(0, 16)),  # one run each: 0-15 -> 16-31, ...
                list(range(16, 32)),
                [33, 35, 37, 39, 41, 43, 45, 47, 32, 34, 36, 38, 40, 42, 44, 46],  # scattered
                list(range(63, 47, -1))]  # reversed: 16 descriptors
    errors = []

    def writer(pages):
        try:
            for _ in range(3):
                local.write_pages(peer.session_id, base, peer.base, peer.bytes_per_page,
                                  pages, [perm[p] for p in pages])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(q,), daemon=True) for q in quarters]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert not any(t.is_alive() for t in threads) and not errors
    assert peer.digests() == expected_digests(src, [(s, perm[s]) for s in range(NUM_PAGES)])


# ---------------------------------------------------------------- reads

def test_read_pages_returns_peer_bytes_and_leaves_peer_unchanged(local, setup):
    src, base, peer = setup
    peer.reset()
    bpp = peer.bytes_per_page
    local.write_pages(peer.session_id, base, peer.base, bpp, [4, 5, 6], [10, 11, 30])
    before = peer.digests()
    got = local.read_pages(peer.session_id, peer.base, bpp, [30, 10, 11, 0, 30])
    assert got.dtype == torch.uint8 and got.shape == (5, bpp)
    got_digests = [page_digest(r.numpy().tobytes()) for r in got]
    assert got_digests == [before[p] for p in (30, 10, 11, 0, 30)]
    assert bool((got[3] == SENTINEL).all())
    assert peer.digests() == before  # a read never writes into the peer
    empty = local.read_pages(peer.session_id, peer.base, bpp, [])
    assert empty.shape == (0, bpp)


def test_read_scratch_grows_and_results_are_owned(local, setup):
    _, _, peer = setup
    bpp = peer.bytes_per_page
    one = local.read_pages(peer.session_id, peer.base, bpp, [1])
    size = local._scratch.numel()
    assert size >= bpp
    many = local.read_pages(peer.session_id, peer.base, bpp, list(range(40)))
    assert local._scratch.numel() >= 40 * bpp  # re-registered larger
    grown = local._scratch.numel()
    again = local.read_pages(peer.session_id, peer.base, bpp, [1])
    assert local._scratch.numel() == grown  # never shrinks
    assert torch.equal(one, again) and torch.equal(many[1], one[0])
    assert one.data_ptr() != again.data_ptr()  # each call returns its own tensor


def test_write_bytes_lands_those_bytes_only(local, setup):
    """The corrupt-KV chaos hook's write: from the transport's scratch, not a pool."""
    src, _, peer = setup
    peer.reset()
    before, pool = peer.digests(), src.clone()
    bpp = peer.bytes_per_page
    local.write_bytes(peer.session_id, peer.base + 3 * bpp + 7, bytes([1, 2]))
    after = peer.digests()
    assert [i for i in range(NUM_PAGES) if after[i] != before[i]] == [3]
    got = local.read_pages(peer.session_id, peer.base, bpp, [3])[0]
    assert got[7:9].tolist() == [1, 2]
    assert bool((got[:7] == SENTINEL).all()) and bool((got[9:] == SENTINEL).all())
    assert torch.equal(src.view(torch.uint8), pool.view(torch.uint8))


def test_read_checks(local, setup):
    _, _, peer = setup
    with pytest.raises(ValueError, match="invalid page ids"):
        local.read_pages(peer.session_id, peer.base, peer.bytes_per_page, [-1])
    with pytest.raises(ValueError, match="bytes_per_page"):
        local.read_pages(peer.session_id, peer.base, 0, [0])
    _, err, _ = run_with_deadline(lambda: local.read_pages(
        peer.session_id, peer.base, peer.bytes_per_page, [NUM_PAGES]), 10)
    assert isinstance(err, TransferError) and "batch_transfer_async_read" in str(err)


# ---------------------------------------------------------------- a peer that dies

def test_dead_peer_raises_promptly(local):
    src = make_pool(8, (4096,), seed=3)
    base = local.register(src)
    peer = PoolPeer.start(8, (4096,))
    try:
        local.write_pages(peer.session_id, base, peer.base, 16384, [0, 1], [2, 3])  # handshake
        peer.process.kill()  # SIGKILL: the child's sockets close under the writer
        peer.process.join(10)
        assert not peer.process.is_alive()
        for _ in range(2):  # the first write notices, the next must not hang either
            _, err, took = run_with_deadline(lambda: local.write_pages(
                peer.session_id, base, peer.base, 16384, [0, 1, 4], [2, 3, 7]), 10)
            assert isinstance(err, TransferError), err
            assert took < 10
        _, err, _ = run_with_deadline(lambda: local.read_pages(
            peer.session_id, peer.base, 16384, [0]), 10)
        assert isinstance(err, TransferError), err
    finally:
        peer.stop()


# ---------------------------------------------------------------- the wait loop, scripted

class FakeEngine:
    """Answers batch_transfer_async_* with fresh ids and transfer_check_status from a
    script: id -> (seconds until finished, final status). Records every poll."""

    def __init__(self, plan, refuse_from=None, sync_rc=0):
        self.plan, self.refuse_from, self.sync_rc = list(plan), refuse_from, sync_rc
        self.submitted, self.polls, self.sync_calls, self.t = {}, [], [], {}

    def batch_transfer_async_write(self, session, local, remote, lengths):
        k = len(self.submitted)
        if self.refuse_from is not None and k >= self.refuse_from:
            return 0
        bid = 1000 + k
        self.submitted[bid] = self.plan[k]
        self.t[bid] = time.perf_counter()
        return bid

    def transfer_check_status(self, bid):
        assert bid in self.submitted, "polled an id that was already finished (freed)"
        self.polls.append(bid)
        after, final = self.submitted[bid]
        if time.perf_counter() - self.t[bid] < after:
            return 0
        del self.submitted[bid]  # Mooncake frees the batch: asking again is use-after-free
        return final

    def batch_transfer_sync_write(self, session, local, remote, lengths):
        self.sync_calls.append(list(lengths))
        return self.sync_rc


def fake_transfer(engine, n=1):
    t = object.__new__(MooncakeTransport)
    return t._transfer(engine, "write", "peer:1", list(range(n)), list(range(n)), [4096] * n,
                       time.perf_counter())


def test_waiting_thread_sleeps_instead_of_spinning():
    engine = FakeEngine([(0.05, 1)])
    cpu0, t0 = time.process_time(), time.perf_counter()
    assert fake_transfer(engine) == (0, "batch_transfer_async_write")
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert wall >= 0.05
    # 50 ms pending: sleeps of 1/8 of the elapsed time (20 us .. 1 ms) are ~80 polls;
    # a spinning loop would make hundreds of thousands
    assert len(engine.polls) < 200, len(engine.polls)
    assert cpu < 0.5 * wall


def test_every_batch_is_waited_for_and_the_first_failure_is_reported():
    engine = FakeEngine([(0.0, 1), (0.01, -1), (0.02, 1), (0.0, -2)])
    assert fake_transfer(engine, 4) == (-1, "batch_transfer_async_write")
    assert not engine.submitted  # all four finished and were released before returning


def test_refused_submission_falls_back_to_sync_after_in_flight_ones():
    engine = FakeEngine([(0.01, 1), (0.0, 1)], refuse_from=2, sync_rc=-1)
    assert fake_transfer(engine, 4) == (-1, "batch_transfer_sync_write")
    assert engine.sync_calls == [[4096, 4096]] and not engine.submitted
    ok = FakeEngine([], refuse_from=0)
    assert fake_transfer(ok, 2) == (0, "batch_transfer_sync_write")


def test_deadline_abandons_a_batch_that_never_finishes():
    engine = FakeEngine([(60.0, 1)])
    engine.batch_transfer_async_write("peer:1", [0], [0], [1])
    t0 = time.perf_counter()
    rc = MooncakeTransport._wait(engine, [1000], t0, t0 + 0.05)
    assert rc == -1 and time.perf_counter() - t0 < 1.0


def test_transfer_timeout_follows_mooncake(monkeypatch):
    monkeypatch.delenv("MC_TRANSFER_TIMEOUT", raising=False)
    assert mt._transfer_timeout_s(2 * 10**9) == pytest.approx(32.0)
    monkeypatch.setenv("MC_TRANSFER_TIMEOUT", "2")
    assert mt._transfer_timeout_s(0) == 5  # Mooncake's floor
    monkeypatch.setenv("MC_TRANSFER_TIMEOUT", "12s")
    assert mt._transfer_timeout_s(0) == 12  # atoi reads the leading digits


def test_timer_slack_is_restored():
    import ctypes

    prctl = ctypes.CDLL(None).prctl
    before = prctl(30, 0, 0, 0, 0)
    with mt._fine_timer_slack():
        inside = prctl(30, 0, 0, 0, 0)
    assert prctl(30, 0, 0, 0, 0) == before
    assert inside == min(before, mt.TIMER_SLACK_NS)
