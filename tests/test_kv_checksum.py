"""pdmesh.transfer.checksum: equal bytes give equal sums whatever the page ids; a flipped
byte, swapped pages or a stale page change them (every algorithm, on CPU); xxh3 and crc32
are the hashes of the pages' concatenated bytes however the pages run, so a new verifier
computes an older writer's crc32 exactly."""
from __future__ import annotations

import pytest
import torch

import random
import zlib

import xxhash

from pdmesh.transfer import checksum as ck
from pdmesh.transfer.checksum import ALGOS, algo_for, pages_checksum


def pools():
    g = torch.Generator().manual_seed(1)
    src = torch.randn(8, 3, 16, generator=g).to(torch.bfloat16)
    dst = torch.zeros_like(src)
    dst[[5, 2, 7]] = src[[1, 3, 4]]  # relocated: other ids, same bytes in the same order
    return src, dst


@pytest.mark.parametrize("algo", ALGOS)
def test_relocated_pages_match(algo):
    src, dst = pools()
    assert pages_checksum(src, [1, 3, 4], algo) == pages_checksum(dst, [5, 2, 7], algo)
    read_back = dst[[5, 2, 7]].reshape(3, -1).contiguous().view(torch.uint8)  # Route.read_pages
    assert pages_checksum(read_back, range(3), algo) == pages_checksum(src, [1, 3, 4], algo)


@pytest.mark.parametrize("algo", ALGOS)
def test_corruption_changes_the_sum(algo):
    src, dst = pools()
    want = pages_checksum(src, [1, 3, 4], algo)
    flipped = dst.clone()
    flipped[2].view(torch.uint8).view(-1)[17] ^= 0x01  # one bit of one byte
    assert pages_checksum(flipped, [5, 2, 7], algo) != want
    assert pages_checksum(dst, [2, 5, 7], algo) != want  # swapped pages
    stale = dst.clone()
    stale[7] = src[6]  # a page left from an earlier room
    assert pages_checksum(stale, [5, 2, 7], algo) != want
    assert pages_checksum(dst, [5, 2], algo) != want  # a page missing


def test_algo_by_device_and_value_range(monkeypatch):
    src, _ = pools()
    assert algo_for(src) == "xxh3"  # a CPU writer's default
    monkeypatch.setattr(ck, "CPU_ALGO", "crc32")  # PDMESH_KV_CHECKSUM_ALGO=crc32
    assert algo_for(src) == "crc32"
    for algo in ALGOS:
        assert 0 <= pages_checksum(src, [0, 1], algo) < 2 ** 64
    assert pages_checksum(src, [], "wsum64") == 0
    with pytest.raises(ValueError, match="unknown KV checksum"):
        pages_checksum(src, [0], "md5")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_equals_cpu():
    src, _ = pools()
    for algo in ALGOS:
        assert pages_checksum(src.cuda(), [1, 3], algo) == pages_checksum(src, [1, 3], algo)


def test_warm_up_runs_both_gpu_paths_and_nothing_on_a_cpu(monkeypatch):
    """A GPU worker digests a consecutive and a scattered page list at start-up (the
    first scattered digest once took 300-400 ms inside a served request on an H200);
    a CPU pool's warm-up does nothing."""
    calls = []
    monkeypatch.setattr(ck, "pages_checksum", lambda pool, pages, algo=None: calls.append(pages))
    src, _ = pools()
    ck.warm_up(src)
    assert calls == []

    class CudaLike:  # what warm_up reads of a pool: device, shape, page bytes
        device, shape = torch.device("cuda"), src.shape
        def __getitem__(self, i):
            return src[i]
        def element_size(self):
            return src.element_size()
    ck.warm_up(CudaLike())
    assert calls == [[0, 1], [1, 0]]  # the in-place run, then the gather (not consecutive)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_warm_up_on_a_gpu_leaves_the_pool_as_it_was():
    src, _ = pools()
    gpu = src.cuda()
    ck.warm_up(gpu)
    assert torch.equal(gpu.cpu(), src)


@pytest.mark.parametrize("pages", [[7, 2, 2, 0, 11, 5], [3, 4, 5, 6], [0, 1, 2, 9, 10, 4]])
@pytest.mark.parametrize("chunk_words", [1, 100, 16 << 20])
def test_wsum64_is_the_same_whatever_the_chunking(monkeypatch, chunk_words, pages):
    """wsum64 digests pages a chunk at a time on a GPU, one at a time on a CPU; the value
    is the definition's
    (sum over positions i of m_i * sum_j w_j * x_ij, mod 2^64) for any chunk size, chunks
    of consecutive pages read in place or scattered ones gathered."""
    from pdmesh.transfer import checksum as c
    pool = torch.randint(-1000, 1000, (12, 2, 3, 16), generator=torch.Generator().manual_seed(1))
    pool = pool.to(torch.bfloat16)
    w = c._table(pool[0].numel() // 2, pool.device)
    m = c._table(len(pages), pool.device, offset=1)
    want = 0
    for i, p in enumerate(pages):
        x = [int(v) for v in pool[p].reshape(-1).view(torch.int32).tolist()]
        want += m[i].item() * sum(a * b for a, b in zip(x, w.tolist()))
    monkeypatch.setattr(c, "_CHUNK_WORDS", chunk_words)
    mask = (1 << 64) - 1
    assert int(c._chunked(pool, pages, w, m).item()) & mask == want & mask  # the GPU's way
    assert pages_checksum(pool, pages, "wsum64") == want & mask


def page_bytes(pool, pages) -> bytes:
    return b"".join(pool[p].contiguous().view(torch.uint8).numpy().tobytes() for p in pages)


@pytest.mark.parametrize("pages", [[3, 4, 5, 1, 2], [0], [7, 6, 5], [2, 2, 3], list(range(8))])
def test_xxh3_and_crc32_are_the_concatenated_bytes_hash(pages):
    """Runs of consecutive pages are hashed as one buffer: the value must not depend on
    how the pages were cut (the old crc32 chained page by page: same value)."""
    src, _ = pools()
    raw = page_bytes(src, pages)
    assert pages_checksum(src, pages, "xxh3") == xxhash.xxh3_64_intdigest(raw)
    old_crc32 = 0
    for p in pages:  # the writer before 2026-11-30
        old_crc32 = zlib.crc32(src[p].contiguous().view(torch.uint8).numpy(), old_crc32)
    assert pages_checksum(src, pages, "crc32") == old_crc32 == zlib.crc32(raw)


@pytest.mark.parametrize("algo", ALGOS)
def test_non_contiguous_pool_and_bad_pages(algo):
    src, _ = pools()
    wide = torch.zeros(8, 3, 32, dtype=torch.bfloat16)
    wide[:, :, ::2] = src  # wide[:, :, ::2] is src's values, not contiguous
    strided = wide[:, :, ::2]
    assert not strided.is_contiguous()
    assert pages_checksum(strided, [4, 1], algo) == pages_checksum(src, [4, 1], algo)
    for bad in ([8], [-1]):
        with pytest.raises(IndexError):
            pages_checksum(src, bad, algo)


@pytest.mark.parametrize("algo", ALGOS)
def test_every_random_corruption_is_detected(algo):
    """300 corruptions of a relocated room (one flipped bit, one random byte, a zeroed
    run of bytes, at random places): the verifier's value differs every time."""
    src, dst = pools()
    want = pages_checksum(src, [1, 3, 4], algo)
    assert pages_checksum(dst, [5, 2, 7], algo) == want
    rng = random.Random(7)
    for i in range(300):
        bad = dst.clone()
        flat = bad[rng.choice([5, 2, 7])].view(torch.uint8).view(-1)
        at = rng.randrange(flat.numel())
        if i % 3 == 0:
            flat[at] ^= 1 << rng.randrange(8)
        elif i % 3 == 1:
            flat[at] = (int(flat[at]) + rng.randrange(1, 256)) % 256
        else:
            end = min(flat.numel(), at + rng.randrange(1, 64))
            zero = not flat[at:end].any()
            flat[at:end] = 0
            if zero:  # the run was zero already: change it some other way
                flat[at] = 1
        assert pages_checksum(bad, [5, 2, 7], algo) != want, (i, at)


def test_gpu_digest_waits_asleep_until_its_event_completes(monkeypatch):
    """_wait polls the digest's CUDA event with sleeps in between (no spinning sync)."""
    from pdmesh.transfer import checksum as c
    naps = []
    monkeypatch.setattr(c.time, "sleep", naps.append)

    class Event:
        polls = 0

        def query(self):
            self.polls += 1
            return self.polls > 3
    ev = Event()
    c._wait(ev)
    assert ev.polls == 4 and naps == [c._POLL_S] * 3


def test_engine_process_digests_once_on_every_kv_thread_of_a_gpu_pool(monkeypatch):
    """A thread's first GPU digest is slow (H200: 16 concurrent 1P1D requests waited
    123.5 ms for their KV the first time, 11.7 ms later): the engine process runs the
    warm-up on each of its KV threads at start, on distinct threads, and not off a GPU;
    then loads the page-copy kernel once (cuda_ipc.warm_up)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from pdmesh.transfer import cuda_ipc
    from pdmesh.worker import core_process

    ran: list[int] = []
    copies: list[object] = []
    monkeypatch.setattr(ck, "warm_up", lambda pool: ran.append(threading.get_ident()))
    monkeypatch.setattr(cuda_ipc, "warm_up", copies.append)
    kv = ThreadPoolExecutor(core_process.KV_THREADS)
    try:
        for device, want in (("cpu", 0), ("cuda", core_process.KV_THREADS)):
            ran.clear()
            copies.clear()
            server = SimpleNamespace(_kv=kv, core=SimpleNamespace(
                pool=SimpleNamespace(device=torch.device(device))))
            core_process.CoreServer._warm_kv_threads(server)
            assert len(ran) == len(set(ran)) == want
            assert copies == ([server.core.pool] if want else [])
    finally:
        kv.shutdown()
