"""Page copy: dst[dst_pages[i]] = src[src_pages[i]] for every i, in one launch.

The KV transfer paths (pdmesh.transfer.cuda_ipc) move whole pages between two pools that
may live in different processes (one of them mapped through a CUDA IPC handle). A page is
an opaque run of bytes, so the kernel copies bytes: src and dst are 2-D views
[num_pages, page] of any dtype with the same bytes per row, read as the widest integer
type the row size, row strides and base addresses allow (int64, int32, int16, else uint8)
so that each thread moves 16-byte vectors instead of single bytes.

Grid = (pages, chunks of a page): page i's chunk c is one program, which loads the whole
chunk (CHUNK_BYTES, 64 KiB) and stores it. Scattered and contiguous page lists cost the
same: each program reads one page id pair and then moves one contiguous chunk, so 256
scattered 2 MiB pages are 8,192 programs of 64 KiB, exactly like one contiguous run.

A pair whose ids fall outside the views is skipped on the device (no write): the ids are
on the GPU and checking them on the host would need a sync, so callers validate before
(pdmesh.transfer.cuda_ipc does) and the kernel never writes outside the destination even
when they did not.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_index_vector, pow2

CHUNK_BYTES = 64 * 1024      # per program: enough bytes in flight to cover HBM latency
NARROW_CHUNK_BYTES = 16 * 1024  # int16/uint8 rows: values take a register each, keep it small
NUM_WARPS = 8
_WIDE = ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2))


@triton.jit
def _copy_pages_kernel(src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, src_rows, dst_rows,
                       src_stride, dst_stride, row_elems, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    s = tl.load(src_ids_ptr + i).to(tl.int64)
    d = tl.load(dst_ids_ptr + i).to(tl.int64)
    # out-of-range ids: skip the pair rather than read or write another allocation
    if (s >= 0) & (s < src_rows) & (d >= 0) & (d < dst_rows):
        offs = c * BLOCK + tl.arange(0, BLOCK)  # int64: pools can exceed 2**31 elements
        mask = offs < row_elems
        v = tl.load(src_ptr + s * src_stride + offs, mask=mask)
        tl.store(dst_ptr + d * dst_stride + offs, v, mask=mask)


def _byte_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """t [rows, k] of any dtype with unit last stride -> the same memory as uint8 rows."""
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [num_pages, page] view, got {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name}: a page must be contiguous, got strides {tuple(t.stride())}")
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def _word_views(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The widest integer views of both byte-row tensors that torch allows for both: the row
    size, row strides and storage offsets must all be multiples of the word size, and so
    must both base addresses (a misaligned int64 access faults on a GPU)."""
    for dtype, width in _WIDE:
        aligned = src.data_ptr() % width == 0 and dst.data_ptr() % width == 0
        if src.shape[1] % width == 0 and aligned:
            try:
                return src.view(dtype), dst.view(dtype)
            except RuntimeError:  # a stride or offset not a multiple of width: narrower
                continue
    return src, dst


def copy_pages(src: torch.Tensor, dst: torch.Tensor, src_pages: torch.Tensor,
               dst_pages: torch.Tensor, chunk_bytes: int | None = None) -> torch.Tensor:
    """dst[dst_pages[i]] = src[src_pages[i]] for every i (bytewise); returns dst.

    src, dst: 2-D [num_pages, page] views (any dtypes, the same bytes per page; the pages
    of each must be contiguous, the page stride is free; the two may have different page
    counts). src_pages, dst_pages: contiguous int32/int64 vectors of equal length on the
    same device. dst_pages should not repeat an id (two pages onto one would race). Ids
    are not checked on the host; pairs out of range are skipped on the device.
    chunk_bytes: bytes per program (default CHUNK_BYTES; for tuning)."""
    sb, db = _byte_rows("src", src), _byte_rows("dst", dst)
    if sb.shape[1] != db.shape[1]:
        raise ValueError(f"src pages are {sb.shape[1]} bytes but dst pages are {db.shape[1]}")
    if src_pages.dim() != 1:
        raise ValueError(f"src_pages must be a 1-D id vector, got {tuple(src_pages.shape)}")
    n = src_pages.shape[0]
    check_index_vector("src_pages", src_pages, n)
    check_index_vector("dst_pages", dst_pages, n)
    devices = {src.device, dst.device, src_pages.device, dst_pages.device}
    if len(devices) != 1:
        raise ValueError(f"src, dst and the page ids must be on one device, got {devices}")
    if n == 0 or sb.shape[1] == 0:
        return dst
    sw, dw = _word_views(sb, db)
    width = sw.element_size()
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES if width >= 4 else NARROW_CHUNK_BYTES
    row_elems = sw.shape[1]
    block = min(pow2(max(chunk_bytes // width, 1)), pow2(row_elems))
    chunks = triton.cdiv(row_elems, block)
    if chunks > 65535:  # CUDA's grid y limit
        raise ValueError(f"a page of {sb.shape[1]} bytes needs {chunks} chunks of {block * width}"
                         " bytes; pass a larger chunk_bytes")
    _copy_pages_kernel[(n, chunks)](
        sw, dw, src_pages, dst_pages, sw.shape[0], dw.shape[0], sw.stride(0), dw.stride(0),
        row_elems, BLOCK=block, num_warps=NUM_WARPS)
    return dst


def copy_pages_ref(src: torch.Tensor, dst: torch.Tensor, src_pages: torch.Tensor,
                   dst_pages: torch.Tensor) -> torch.Tensor:
    """Torch reference: the same bytewise copy through index_copy_ (ids must be in range)."""
    sb, db = _byte_rows("src", src), _byte_rows("dst", dst)
    db.index_copy_(0, dst_pages.long(), sb.index_select(0, src_pages.long()))
    return dst
