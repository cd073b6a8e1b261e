"""pdmesh.transfer.checksum: equal bytes give equal sums whatever the page ids; a flipped
byte, swapped pages or a stale page change them (both algorithms, on CPU)."""
from __future__ import annotations

import pytest
import torch

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


def test_algo_by_device_and_value_range():
    src, _ = pools()
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


@pytest.mark.parametrize("chunk_words", [1, 100, 16 << 20])
def test_wsum64_is_the_same_whatever_the_chunking(monkeypatch, chunk_words):
    """wsum64 digests pages a chunk at a time on a GPU, one at a time on a CPU; the value
    is the definition's
    (sum over positions i of m_i * sum_j w_j * x_ij, mod 2^64) for any chunk size."""
    from pdmesh.transfer import checksum as c
    pool = torch.randint(-1000, 1000, (12, 2, 3, 16), generator=torch.Generator().manual_seed(1))
    pool = pool.to(torch.bfloat16)
    pages = [7, 2, 2, 0, 11, 5]
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
