"""Router (pdmesh.transfer.route): the path into each decode pool, chosen at bind by measurement.

Unit tests with fake paths; the real shm path end to end is in tests/test_transfer_shm.py
and the mesh tests (tests/test_observability.py asserts a 1P1D mesh writes through shm).
"""
from __future__ import annotations

import logging
import sys
import threading
import time
import types

import pytest

from pdmesh.transfer import route as rt
from pdmesh.transfer.base import TransferStats

HOST = "boot/host"
BPP = 8


class FakeTransport:
    """Transfer engine: reads `memory[page]`, takes `delay` seconds per call."""

    def __init__(self, memory: dict[int, bytes], delay: float = 0.0) -> None:
        self.memory, self.delay, self.writes = memory, delay, []

    def write_pages(self, session, src_base, dst_base, bpp, src, dst) -> TransferStats:
        time.sleep(self.delay)
        self.writes.append((session, list(src), list(dst)))
        return TransferStats(len(src) * bpp, 1, self.delay)

    def read_pages(self, session, base, bpp, pages) -> bytes:
        time.sleep(self.delay)
        return b"".join(self.memory[p] for p in pages)

    def write_bytes(self, session, addr, data) -> None:
        self.writes.append((session, addr, data))


class FakePeer:
    def __init__(self, memory: dict[int, bytes], delay: float, log: list) -> None:
        self.memory, self.delay, self.log, self.name = memory, delay, log, "shm"
        self.closed, self.in_write = False, threading.Event()
        self.release = threading.Event()
        self.release.set()

    def write_pages(self, src, dst, bpp) -> TransferStats:
        assert not self.closed, "write through a closed peer"
        self.in_write.set()
        self.release.wait(5)
        assert not self.closed, "closed while a write was in flight"
        self.log.append(("write", list(src), list(dst)))
        return TransferStats(len(src) * bpp, 1, self.delay)

    def read_pages(self, pages, bpp) -> bytes:
        time.sleep(self.delay)
        return b"".join(self.memory[p] for p in pages)

    def close(self) -> None:
        self.closed = True
        self.log.append(("close",))


@pytest.fixture
def fake_shm(monkeypatch):
    """Install a fake "shm" local path; returns its state (peers opened, open errors)."""
    state = types.SimpleNamespace(memory={p: bytes([p]) * BPP for p in range(16)}, delay=0.0,
                                  fail=None, peers=[], log=[])

    def open_peer(uri, local_pool):
        if state.fail:
            raise OSError(state.fail)
        peer = FakePeer(state.memory, state.delay, state.log)
        state.peers.append(peer)
        return peer
    mod = types.ModuleType("fake_shm_path")
    mod.export_pool = lambda pool: "shm:/proc/1/fd/3?bytes=128"
    mod.open_peer = open_peer
    monkeypatch.setitem(sys.modules, "fake_shm_path", mod)
    monkeypatch.setitem(rt.LOCAL_PATHS, "shm", "fake_shm_path")
    monkeypatch.delitem(rt.LOCAL_PATHS, "ipc")
    return state


def dest(host=HOST, endpoints=("shm:/proc/1/fd/3?bytes=128",)) -> rt.Destination:
    return rt.Destination("127.0.0.1:1234", 0x1000, host, tuple(endpoints))


def router(transport, path="auto") -> rt.Router:
    return rt.Router(transport, 0x2000, pool=None, bytes_per_page=BPP, path=path, my_host=HOST)


def test_the_faster_path_wins_and_names_the_stats(fake_shm, caplog):
    eng = FakeTransport(fake_shm.memory, delay=0.005)
    r = router(eng)
    with caplog.at_level(logging.INFO, logger="pdmesh.transfer.route"):
        stats = r.write_pages(dest(), [0, 1], [5, 6])
    assert stats.path == "shm" and stats.bytes == 2 * BPP
    assert fake_shm.log == [("write", [0, 1], [5, 6])] and eng.writes == []
    assert "KV path to 127.0.0.1:1234: shm" in caplog.text and "mooncake" in caplog.text
    # bound once: later writes take the same route without probing again
    r.write_pages(dest(), [2], [7])
    assert len(fake_shm.peers) == 1 and r.route_name(dest()) == "shm"


def test_a_slower_local_path_loses_to_the_engine(fake_shm):
    fake_shm.delay = 0.01
    eng = FakeTransport(fake_shm.memory, delay=0.0)
    stats = router(eng).write_pages(dest(), [0], [5])
    assert stats.path == "mooncake" and eng.writes and fake_shm.peers[0].closed


def test_a_local_path_a_little_slower_keeps_the_pair(fake_shm):
    """Within LOCAL_MARGIN of the engine (probe noise on a busy host) the local path wins:
    CI once saw Mooncake picked over shared memory on a loaded 2-core machine."""
    fake_shm.delay = 0.006
    eng = FakeTransport(fake_shm.memory, delay=0.004)
    stats = router(eng).write_pages(dest(), [0], [5])
    assert stats.path == "shm" and not eng.writes


def test_a_local_path_reading_other_bytes_is_dropped(fake_shm, caplog):
    eng = FakeTransport({p: b"\xff" * BPP for p in range(16)}, delay=0.005)
    with caplog.at_level(logging.WARNING, logger="pdmesh.transfer.route"):
        stats = router(eng).write_pages(dest(), [0], [5])
    assert stats.path == "mooncake" and "reads other bytes" in caplog.text


@pytest.mark.parametrize("case", ["other host", "no endpoint", "forced mooncake"])
def test_no_local_path_across_hosts_or_when_forced_off(fake_shm, case):
    eng = FakeTransport(fake_shm.memory)
    d = {"other host": dest(host="boot/other"), "no endpoint": dest(endpoints=()),
         "forced mooncake": dest()}[case]
    r = router(eng, path="mooncake" if case == "forced mooncake" else "auto")
    assert r.write_pages(d, [0], [5]).path == "mooncake" and not fake_shm.peers


def test_forced_local_path_that_does_not_open_falls_back(fake_shm, caplog):
    fake_shm.fail = "permission denied"
    eng = FakeTransport(fake_shm.memory)
    with caplog.at_level(logging.INFO, logger="pdmesh.transfer.route"):
        assert router(eng, path="shm").write_pages(dest(), [0], [5]).path == "mooncake"
    assert "does not open: permission denied" in caplog.text
    assert "KV path shm does not reach" in caplog.text


def test_forced_local_path_skips_the_engine(fake_shm):
    eng = FakeTransport(fake_shm.memory, delay=0.0)
    fake_shm.delay = 0.01  # slower, but forced
    assert router(eng, path="shm").write_pages(dest(), [0], [5]).path == "shm"


def test_no_transport_and_no_local_path_is_an_error(fake_shm):
    with pytest.raises(RuntimeError, match="no KV path"):
        router(None).write_pages(dest(host="elsewhere"), [0], [5])


def test_forget_closes_a_route_only_after_its_write_finished(fake_shm):
    r = router(None)  # local path only
    r.write_pages(dest(), [0], [5])
    peer = fake_shm.peers[0]
    peer.release.clear()
    t = threading.Thread(target=r.write_pages, args=(dest(), [1], [6]))
    t.start()
    assert peer.in_write.wait(5)
    r.forget("127.0.0.1:1234")
    assert not peer.closed  # a write is in flight
    peer.release.set()
    t.join(5)
    assert peer.closed and fake_shm.log[-1] == ("close",)
    r.write_pages(dest(), [2], [7])  # the peer came back: binds anew
    assert len(fake_shm.peers) == 2


def test_concurrent_first_writes_bind_once(fake_shm):
    eng = FakeTransport(fake_shm.memory, delay=0.002)
    r = router(eng)
    threads = [threading.Thread(target=r.write_pages, args=(dest(), [i], [i + 8]))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(fake_shm.peers) == 1
    assert sorted(w[1][0] for w in fake_shm.log if w[0] == "write") == list(range(8))


def test_the_chaos_hook_pokes_the_destination_through_the_engine(fake_shm):
    """corrupt_page reads the source page and changes one byte of the destination page
    through the route (here the engine: at kv_base + page * bytes_per_page + offset)."""
    import torch

    eng = FakeTransport(fake_shm.memory)
    r = rt.Router(eng, 0x2000, pool=torch.zeros(4, BPP, dtype=torch.uint8),
                  bytes_per_page=BPP, path="mooncake", my_host=HOST)
    r.corrupt_page(dest(), 1, 3)
    assert eng.writes == [("127.0.0.1:1234", 0x1000 + 3 * BPP, bytes([0x7F]))]


def test_unknown_path_is_refused():
    with pytest.raises(ValueError, match="kv path must be one of"):
        rt.Router(None, 0, None, BPP, path="nvlink")


def test_host_id_is_stable_and_names_the_host():
    import socket
    assert rt.host_id() == rt.host_id() and rt.host_id().endswith(socket.gethostname())
