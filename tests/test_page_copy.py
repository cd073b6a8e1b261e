"""copy_pages (kernels/page_copy.py) against its torch reference.

On CPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py sets it) at small
shapes; on CUDA the same tests run on the device, plus KV-sized pages. Destinations start
as a sentinel byte so a page the kernel forgets, a stray write or a partial chunk fails the
exact comparison.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

CUDA = torch.cuda.is_available()
assert CUDA or os.environ.get("TRITON_INTERPRET") == "1", "conftest must set TRITON_INTERPRET"

from pdmesh.kernels.page_copy import _byte_rows, _word_views, copy_pages, copy_pages_ref  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
SENTINEL = 0xA5


@pytest.fixture
def rng():
    s = random.randrange(2 ** 31)
    torch.manual_seed(s)
    return random.Random(s)


def pool(pages: int, page_bytes: int) -> torch.Tensor:
    return torch.randint(0, 256, (pages, page_bytes), dtype=torch.uint8, device=DEV)


def sentinel(pages: int, page_bytes: int) -> torch.Tensor:
    return torch.full((pages, page_bytes), SENTINEL, dtype=torch.uint8, device=DEV)


def ids(values, dtype=torch.int64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=DEV)


def check(src, dst, s, d, **kw):
    """copy_pages and copy_pages_ref on copies of dst agree byte for byte."""
    want = copy_pages_ref(src, dst.clone(), s, d)
    got = copy_pages(src, dst, s, d, **kw)
    assert got is dst
    assert torch.equal(_byte_rows("got", got), _byte_rows("want", want))


# 64: int64 words; 36: int32; 6: int16; 7, 1: odd, bytewise
@pytest.mark.parametrize("page_bytes", [64, 36, 6, 7, 1])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_scattered_unsorted_repeated_sources(page_bytes, id_dtype, rng):
    src, dst = pool(9, page_bytes), sentinel(13, page_bytes)  # different page counts
    d = rng.sample(range(13), 6)                          # unsorted, distinct destinations
    s = [rng.randrange(9) for _ in d[:-2]] + [4, 4]       # sources may repeat
    check(src, dst, ids(s, id_dtype), ids(d, id_dtype))
    untouched = [p for p in range(13) if p not in d]
    assert (dst[untouched] == SENTINEL).all()
    for si, di in zip(s, d):
        assert torch.equal(dst[di], src[si])


@pytest.mark.parametrize("page_bytes,chunk_bytes", [(1000, 64), (1003, 64), (520, 16), (96, 8)])
def test_pages_split_into_chunks_with_a_partial_last_one(page_bytes, chunk_bytes, rng):
    src, dst = pool(5, page_bytes), sentinel(6, page_bytes)
    check(src, dst, ids([3, 0, 4]), ids([5, 2, 0]), chunk_bytes=chunk_bytes)
    assert (dst[[1, 3, 4]] == SENTINEL).all()


def test_any_dtype_is_copied_bitwise(rng):
    src = torch.randn(6, 24, dtype=torch.float32, device=DEV)       # 96-byte pages
    src[0, 0] = float("nan")                                        # bits, not values
    dst = torch.zeros(4, 48, dtype=torch.bfloat16, device=DEV)      # also 96-byte pages
    check(src, dst, ids([0, 5]), ids([3, 1]))
    assert torch.equal(dst[3].view(torch.uint8), src[0].view(torch.uint8))


def test_page_stride_larger_than_the_page(rng):
    """Views into wider rows (pages of a padded pool): only the page itself is copied."""
    src = pool(5, 80)[:, 8:48]                 # 40-byte pages, row stride 80
    dst_full = sentinel(7, 72)
    dst = dst_full[:, 16:56]
    check(src, dst, ids([1, 4, 2]), ids([6, 0, 3]))
    assert (dst_full[:, :16] == SENTINEL).all() and (dst_full[:, 56:] == SENTINEL).all()


def test_word_width_follows_size_stride_and_alignment():
    b = torch.zeros(4, 64, dtype=torch.uint8, device=DEV)
    assert _word_views(b, b)[0].dtype == torch.int64
    assert _word_views(b[:, :36], b[:, :36])[0].dtype == torch.int32
    assert _word_views(b[:, :6], b[:, :6])[0].dtype == torch.int16
    assert _word_views(b[:, :7], b[:, :7])[0].dtype == torch.uint8
    assert _word_views(b[:, 4:36], b[:, :32])[0].dtype == torch.int32  # offset 4: not int64
    assert _word_views(b[:, 1:33], b[:, :32])[0].dtype == torch.uint8  # odd offset
    odd_stride = torch.zeros(4 * 66, dtype=torch.uint8, device=DEV).view(4, 66)[:, :64]
    assert _word_views(odd_stride, b)[0].dtype == torch.int16


def test_misaligned_views_still_copy(rng):
    src = pool(4, 70)[:, 1:65]    # 64-byte pages at an odd offset and a 70-byte stride
    dst = sentinel(4, 64)
    check(src, dst, ids([0, 3]), ids([2, 1]))


def test_out_of_range_pairs_are_skipped_on_the_device():
    src, dst = pool(3, 16), sentinel(4, 16)
    copy_pages(src, dst, ids([0, 3, -1, 1, 2]), ids([0, 1, 2, 4, 3]))
    assert torch.equal(dst[0], src[0]) and torch.equal(dst[3], src[2])
    assert (dst[1:3] == SENTINEL).all()


def test_empty_page_list_is_a_no_op():
    src, dst = pool(3, 16), sentinel(3, 16)
    copy_pages(src, dst, ids([]), ids([]))
    assert (dst == SENTINEL).all()


def test_bad_arguments_raise_value_error():
    src, dst = pool(3, 16), sentinel(3, 16)
    with pytest.raises(ValueError, match="bytes"):
        copy_pages(src, sentinel(3, 17), ids([0]), ids([0]))
    with pytest.raises(ValueError, match="dst_pages"):
        copy_pages(src, dst, ids([0, 1]), ids([0]))
    with pytest.raises(ValueError, match="src_pages"):
        copy_pages(src, dst, torch.tensor([0.0], device=DEV), ids([0]))
    with pytest.raises(ValueError, match="contiguous"):
        copy_pages(pool(16, 3).t(), dst, ids([0]), ids([0]))
    with pytest.raises(ValueError, match="2-D"):
        copy_pages(src.view(-1), dst, ids([0]), ids([0]))


@pytest.mark.skipif(not CUDA, reason="KV-sized pages: CUDA only (too slow interpreted)")
@pytest.mark.parametrize("page_bytes", [2 << 20, 30 * 16 * 2 * 3 * 64 * 2, (1 << 20) + 3])
def test_kv_sized_pages_on_cuda(page_bytes, rng):
    src, dst = pool(40, page_bytes), sentinel(64, page_bytes)
    d = rng.sample(range(64), 32)
    check(src, dst, ids(rng.sample(range(40), 32), torch.int32), ids(d, torch.int32))


def test_ipc_warm_up_launches_the_kernel_over_the_pool_and_writes_nothing(monkeypatch):
    """cuda_ipc.warm_up (run by an engine process at start, so that the first scattered
    KV transfer does not load the kernel inside a request): one launch over the pool's
    own [pages, page bytes] rows, ids out of range; the pool is unchanged."""
    import pdmesh.kernels.page_copy as page_copy
    from pdmesh.transfer import cuda_ipc

    kv = torch.randn(5, 2, 4, 2, 3, 8)  # [P, L, page, 2, Hkv, D]
    before, calls = kv.clone(), []

    def spy(src, dst, s, d, **kw):
        calls.append((tuple(src.shape), src.data_ptr() == kv.data_ptr(), s.tolist(), d.tolist()))
        return copy_pages(src, dst, s, d, **kw)
    monkeypatch.setattr(page_copy, "copy_pages", spy)
    cuda_ipc.warm_up(kv)
    assert calls == [((5, kv[0].numel() * 4), True, [-1, -1], [-1, -1])]
    assert torch.equal(kv, before)
