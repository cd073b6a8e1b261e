"""pdmesh.transfer.shm between real processes: a spawned child owns the pool (alloc_pool),
this process opens it by URI and writes/reads pages. No mocks."""
from __future__ import annotations

import gc
import multiprocessing as mp
import os
import re
import signal

import pytest
import torch

from pdmesh.transfer import shm
from pdmesh.transfer.base import TransferError
from pdmesh.transfer.plan import plan_runs

PAGE_SHAPE = (3, 5, 7)  # float32: 420 bytes, not a power of two, so offset bugs show
BPP = 420
PEER_PAGES = 16
LOCAL_PAGES = 12  # fewer than the peer's, so each side's bounds are checked separately


def pattern(num_pages: int, bpp: int = BPP) -> torch.Tensor:
    """The bytes the child's pool starts with: distinct per page and per offset, so a
    stray or misplaced write anywhere is caught."""
    p = torch.arange(num_pages).unsqueeze(1) * 31 + torch.arange(bpp).unsqueeze(0)
    return (p % 251).to(torch.uint8)


def _child(conn, num_pages: int) -> None:
    # Owns a shared pool; answers ("bytes",) with its whole content, ("reset",), ("stop",).
    pool = shm.alloc_pool((num_pages, *PAGE_SHAPE), torch.float32)
    raw = pool.view(num_pages, -1).view(torch.uint8)
    raw.copy_(pattern(num_pages))
    conn.send(shm.export_pool(pool))
    while True:
        op = conn.recv()
        if op == "bytes":
            conn.send(raw.clone())
        elif op == "reset":
            raw.copy_(pattern(num_pages))
            conn.send("ok")
        else:
            conn.send("stopped")
            return


class Child:
    """A child process holding a PEER_PAGES-page pool from alloc_pool."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child_end = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child_end, PEER_PAGES), daemon=True)
        self.proc.start()
        assert self.conn.poll(60), "child did not start"
        self.uri = self.conn.recv()

    def ask(self, op: str):
        self.conn.send(op)
        assert self.conn.poll(30), f"child did not answer {op}"
        return self.conn.recv()

    def stop(self) -> None:
        if self.proc.is_alive():
            self.ask("stop")
        self.proc.join(10)


@pytest.fixture(scope="module")
def child():
    c = Child()
    yield c
    c.stop()


@pytest.fixture
def local():
    gen = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (LOCAL_PAGES, BPP), dtype=torch.uint8, generator=gen)
    return raw.view(torch.float32).view(LOCAL_PAGES, *PAGE_SHAPE)


@pytest.fixture
def peer(child, local):
    child.ask("reset")
    p = shm.open_peer(child.uri, local)
    yield p
    p.close()


def local_bytes(local: torch.Tensor) -> torch.Tensor:
    return local.view(LOCAL_PAGES, -1).view(torch.uint8)


def test_alloc_pool_is_a_zeroed_memfd_and_exports_a_uri():
    pool = shm.alloc_pool((4, 6, 2), torch.bfloat16)
    assert pool.shape == (4, 6, 2) and pool.dtype == torch.bfloat16 and pool.is_contiguous()
    assert not pool.view(torch.uint8).any()
    uri = shm.export_pool(pool)
    m = re.fullmatch(r"shm:/proc/(\d+)/fd/(\d+)\?bytes=(\d+)", uri)
    assert m and int(m[1]) == os.getpid() and int(m[3]) == 4 * 6 * 2 * 2
    assert os.readlink(f"/proc/self/fd/{m[2]}").startswith("/memfd:pdmesh-kv")


def test_export_pool_is_none_for_other_tensors():
    assert shm.export_pool(torch.zeros(4, 8)) is None
    pool = shm.alloc_pool((4, 8), torch.float32)
    assert shm.export_pool(pool[1:]) is None  # does not start where the pool does
    assert shm.export_pool(pool.t()) is None  # not contiguous


def test_the_fd_closes_with_the_pool():
    pool = shm.alloc_pool((2, 64), torch.float32)
    path = shm.export_pool(pool)[len("shm:"):].split("?")[0]
    fd_link = path.replace(f"/proc/{os.getpid()}/", "/proc/self/")
    view = pool[1]
    del pool
    gc.collect()
    assert os.readlink(fd_link).startswith("/memfd:pdmesh-kv")  # a view keeps it alive
    del view
    gc.collect()
    assert not os.path.exists(fd_link) or not os.readlink(fd_link).startswith("/memfd:pdmesh")


def test_write_scattered_and_consecutive_pages_land_exactly(child, peer, local):
    src, dst = [3, 0, 9, 4, 5, 6, 7], [12, 5, 1, 8, 9, 10, 11]
    stats = peer.write_pages(src, dst, BPP)
    assert (stats.bytes, stats.descriptors) == (7 * BPP, len(plan_runs(src, dst))) == (7 * BPP, 4)
    assert stats.seconds > 0
    expected = pattern(PEER_PAGES)
    expected[dst] = local_bytes(local)[src]
    assert torch.equal(child.ask("bytes"), expected)

    stats = peer.write_pages([0, 1, 2], [13, 14, 15], BPP)  # one run, one descriptor
    assert stats.descriptors == 1
    expected[[13, 14, 15]] = local_bytes(local)[[0, 1, 2]]
    assert torch.equal(child.ask("bytes"), expected)
    assert peer.write_pages([], [], BPP).bytes == 0


def test_read_pages_returns_the_peers_bytes(child, peer):
    got = peer.read_pages([2, 7, 7, 0, 15], BPP)
    assert got.dtype == torch.uint8 and got.shape == (5, BPP)
    assert torch.equal(got, pattern(PEER_PAGES)[[2, 7, 7, 0, 15]])
    assert torch.equal(child.ask("bytes"), pattern(PEER_PAGES))  # reading changed nothing


@pytest.mark.parametrize("src, dst, bpp", [
    ([0, 1], [2], BPP),  # unequal lengths
    ([0, -1], [2, 3], BPP),  # negative id
    ([0, 1.0], [2, 3], BPP),  # not an int
    ([0, 1], [2, 2], BPP),  # a destination page twice
    ([0, LOCAL_PAGES], [2, 3], BPP),  # past the local pool
    ([0, 1], [2, PEER_PAGES], BPP),  # past the peer pool
    ([0, 1], [7, 8], 2 * BPP),  # in range for BPP, past the peer for 2 * BPP
    ([0, 1], [2, 3], 0),
])
def test_bad_writes_raise_and_change_nothing(child, peer, src, dst, bpp):
    with pytest.raises(ValueError):
        peer.write_pages(src, dst, bpp)
    assert torch.equal(child.ask("bytes"), pattern(PEER_PAGES))


@pytest.mark.parametrize("pages", [[PEER_PAGES], [-1], [0, "1"]])
def test_bad_reads_raise(peer, pages):
    with pytest.raises(ValueError):
        peer.read_pages(pages, BPP)


@pytest.mark.parametrize("uri", [
    "", "cuda_ipc:AAAA", "shm:/dev/shm/kv?bytes=10", "shm:/proc/12/fd/3",
    "shm:/proc/x/fd/3?bytes=10", "shm:/proc/12/fd/3?bytes=0", "shm:/proc/0/fd/3?bytes=10",
    "shm:/proc/12/fd/3?bytes=10&x=1", " shm:/proc/12/fd/3?bytes=10",
])
def test_malformed_uri_is_a_value_error(local, uri):
    with pytest.raises(ValueError):
        shm.open_peer(uri, local)


def test_unusable_local_pool_is_a_value_error(child, local):
    with pytest.raises(ValueError):
        shm.open_peer(child.uri, local.transpose(1, 2))


def test_what_is_not_a_pool_is_refused(tmp_path, local):
    with open(tmp_path / "victim", "wb") as f:  # a real file must never be written over
        f.write(b"x" * 4096)
        f.flush()
        with pytest.raises(OSError):
            shm.open_peer(f"shm:/proc/{os.getpid()}/fd/{f.fileno()}?bytes=4096", local)
    assert (tmp_path / "victim").read_bytes() == b"x" * 4096
    pool = shm.alloc_pool((2, 8), torch.float32)
    bigger = shm.export_pool(pool).replace("bytes=64", "bytes=65")
    with pytest.raises(OSError):  # a stale uri naming another (smaller) pool
        shm.open_peer(bigger, local)


def test_dead_peer_cannot_be_opened(local):
    c = Child()
    os.kill(c.proc.pid, signal.SIGKILL)
    c.proc.join(10)
    with pytest.raises(OSError):
        shm.open_peer(c.uri, local)


def test_close_is_idempotent_and_final(child, local):
    p = shm.open_peer(child.uri, local)
    p.close()
    p.close()
    with pytest.raises(TransferError):
        p.write_pages([0], [0], BPP)
    with pytest.raises(TransferError):
        p.read_pages([0], BPP)
