"""Same-host KV transfer through shared memory, for CPU pools.

The decode worker allocates its KV pool with `alloc_pool`: the tensor's memory is a
memfd mapped MAP_SHARED. `export_pool` names it by a URI,
"shm:/proc/<pid>/fd/<fd>?bytes=<nbytes>"; a prefill worker of the same user on the same
host (and in the same pid namespace) passes that URI to `open_peer`, which maps the same
physical pages, and `ShmPeer.write_pages` then copies KV pages straight into the decode
worker's pool with torch (a memcpy; no socket, no copy through the kernel).

    pool = alloc_pool((num_pages, *page_shape), torch.float32)   # decode worker
    uri = export_pool(pool)                                       # -> sent to prefill
    peer = open_peer(uri, local_pool)                             # prefill worker
    stats = peer.write_pages(src_pages, dst_pages, bytes_per_page)

A memfd has no name in the file system: its memory lives as long as some process holds
the fd or a mapping, so a decode worker killed with -9 leaks nothing (no /dev/shm file).
A writer that still has the pool mapped keeps those pages alive until `close`; writes into
a dead peer succeed silently, so liveness is the control plane's business, as for Mooncake.
"""
from __future__ import annotations

import errno
import mmap
import os
import re
import time
import weakref
from typing import Sequence

import torch

from pdmesh.transfer.base import TransferError, TransferStats
from pdmesh.transfer.plan import plan_runs, validate_pages

NAME = "shm"
MEMFD_NAME = "pdmesh-kv"  # /proc/<pid>/fd/<fd> reads "/memfd:pdmesh-kv (deleted)"
_URI = re.compile(r"shm:/proc/(\d+)/fd/(\d+)\?bytes=(\d+)")

# data_ptr of each live alloc_pool mapping -> (weak ref to its mmap, fd, nbytes). Weak, so
# the registry never keeps a pool alive; a dead entry means that address is no pool now.
_POOLS: dict[int, tuple[weakref.ref, int, int]] = {}


def alloc_pool(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed, contiguous CPU tensor of `shape` and `dtype` whose memory is a memfd
    mapped MAP_SHARED, so that `export_pool` can hand it to another process of this host.

    The fd stays open exactly as long as the tensor's storage (any view of it) lives.
    Pages are faulted in now (MAP_POPULATE), as torch.zeros would touch them, so the first
    transfer into the pool does not pay the page faults.
    """
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * dtype.itemsize
    if nbytes <= 0:
        raise ValueError(f"a pool needs at least one byte, got shape {tuple(shape)}")
    fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)  # a fresh memfd reads as zeros
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    except BaseException:
        os.close(fd)
        raise
    # torch.frombuffer holds a reference to `mm` in the storage's deleter, so the mapping
    # (and, through the finalizer, our fd) lives exactly as long as the storage.
    weakref.finalize(mm, os.close, fd)
    raw = torch.frombuffer(mm, dtype=torch.uint8)
    _prune()
    _POOLS[raw.data_ptr()] = (weakref.ref(mm), fd, nbytes)
    return raw.view(dtype).view(tuple(shape))


def export_pool(pool: torch.Tensor) -> str | None:
    """The URI ("shm:/proc/<pid>/fd/<fd>?bytes=<nbytes>") a process of this host passes to
    `open_peer` to write into `pool`; None unless `pool` is a contiguous tensor starting
    where an `alloc_pool` tensor does (looked up by data_ptr)."""
    entry = _POOLS.get(pool.data_ptr()) if pool.device.type == "cpu" else None
    if entry is None or entry[0]() is None or not pool.is_contiguous():
        return None
    _, fd, size = entry
    nbytes = pool.numel() * pool.element_size()
    if not 0 < nbytes <= size:
        return None
    return f"shm:/proc/{os.getpid()}/fd/{fd}?bytes={nbytes}"


def open_peer(uri: str, local_pool: torch.Tensor) -> "ShmPeer":
    """Map the peer pool named by `uri` (from `export_pool`) for writing from `local_pool`,
    this process's own contiguous CPU pool (the source of writes).

    Raises ValueError for a malformed uri, another scheme, or an unusable local_pool;
    OSError (PermissionError, FileNotFoundError, ...) if the peer's pool cannot be opened
    (peer gone, other user or pid namespace, stale uri): the caller then uses Mooncake.
    """
    pid, fd_no, nbytes = _parse(uri)
    local = _byte_view(local_pool, "local_pool")
    fd = os.open(f"/proc/{pid}/fd/{fd_no}", os.O_RDWR | os.O_CLOEXEC)
    try:
        _check_opened(fd, nbytes, uri)
        # Populate now (~0.1 ms per MB, once per bind): a first write into pages not yet
        # mapped here runs ~6x slower, paying a page fault per 4 KiB.
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    finally:
        os.close(fd)  # the mapping keeps the memfd's pages alive by itself
    return ShmPeer(uri, local, mm)


class ShmPeer:
    """A peer's pool mapped into this process; writes copy local pages into it.

    write_pages and read_pages may run from several threads at once. `close` may race
    them safely: each call holds its own reference to the mapping, and the memory is
    unmapped when the last reference goes.
    """

    name = NAME

    def __init__(self, uri: str, local: torch.Tensor, mm: mmap.mmap) -> None:
        self.uri = uri
        self._local = local  # uint8 view of this process's pool
        self._remote: torch.Tensor | None = torch.frombuffer(mm, dtype=torch.uint8)
        # No mm.close() anywhere: frombuffer does not pin the buffer, so closing it
        # under a live view would leave a dangling pointer. Dropping refs is the unmap.

    def write_pages(self, src_pages: Sequence[int], dst_pages: Sequence[int],
                    bytes_per_page: int) -> TransferStats:
        """Copy local page src_pages[i] over the peer's page dst_pages[i], for every i.

        Raises ValueError, before copying anything, for bad page lists or a page outside
        either pool. Consecutive runs are copied as one block (descriptors = runs).
        """
        remote = self._live()
        validate_pages(src_pages, dst_pages)
        _check_bounds(src_pages, bytes_per_page, self._local, "src_pages (local pool)")
        _check_bounds(dst_pages, bytes_per_page, remote, "dst_pages (peer pool)")
        if not src_pages:
            return TransferStats(0, 0, 0.0)
        runs = plan_runs(src_pages, dst_pages)
        b = bytes_per_page
        t0 = time.perf_counter()
        for s, d, n in runs:
            remote[d * b:(d + n) * b].copy_(self._local[s * b:(s + n) * b])  # GIL released
        seconds = time.perf_counter() - t0
        return TransferStats(bytes=len(src_pages) * b, descriptors=len(runs), seconds=seconds)

    def read_pages(self, peer_pages: Sequence[int], bytes_per_page: int) -> torch.Tensor:
        """A new uint8 tensor [len(peer_pages), bytes_per_page] holding a copy of the peer's
        pages (ids may repeat). Reads only; raises ValueError for a bad or out-of-range id."""
        remote = self._live()
        rows = list(range(len(peer_pages)))
        validate_pages(peer_pages, rows)  # peer ids are the "source": repeats allowed
        _check_bounds(peer_pages, bytes_per_page, remote, "peer_pages")
        b = bytes_per_page
        out = torch.empty(len(rows), b, dtype=torch.uint8)
        flat = out.view(-1)
        for s, r, n in plan_runs(peer_pages, rows):
            flat[r * b:(r + n) * b].copy_(remote[s * b:(s + n) * b])
        return out

    def poke(self, at: int, value: int) -> None:
        """Set the peer pool's byte `at` (the corrupt-KV chaos hook)."""
        remote = self._live()
        if not 0 <= at < remote.numel():
            raise ValueError(f"byte {at} is outside the peer pool ({remote.numel()} bytes)")
        remote[at] = value

    def checksum_pages(self, peer_pages: Sequence[int], bytes_per_page: int, algo: str) -> int:
        """pdmesh.transfer.checksum of the peer's pages, digested where they are mapped
        (no copy: a third of a room's check time at 2k tokens on the dev machine)."""
        from pdmesh.transfer.checksum import pages_checksum

        remote = self._live()
        validate_pages(peer_pages, list(range(len(peer_pages))))  # ids >= 0, repeats allowed
        _check_bounds(peer_pages, bytes_per_page, remote, "peer_pages")
        n = remote.numel() // bytes_per_page
        return pages_checksum(remote[:n * bytes_per_page].view(n, bytes_per_page),
                              peer_pages, algo)

    def close(self) -> None:
        """Unmap the peer's pool (once no call in flight still uses it). Idempotent."""
        self._remote = None

    def _live(self) -> torch.Tensor:
        remote = self._remote
        if remote is None:
            raise TransferError(-1, f"use of closed ShmPeer {self.uri}")
        return remote

    def __enter__(self) -> "ShmPeer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse(uri: str) -> tuple[int, int, int]:
    if not isinstance(uri, str) or not uri.startswith(NAME + ":"):
        raise ValueError(f"not a {NAME} uri: {uri!r}")
    m = _URI.fullmatch(uri)
    if m is None:
        raise ValueError(f"malformed {NAME} uri {uri!r} (want shm:/proc/<pid>/fd/<fd>?bytes=<n>)")
    pid, fd, nbytes = (int(g) for g in m.groups())
    if pid < 1 or nbytes < 1:
        raise ValueError(f"malformed {NAME} uri {uri!r}: pid and bytes must be >= 1")
    return pid, fd, nbytes


def _check_opened(fd: int, nbytes: int, uri: str) -> None:
    # A pid or fd number can be reused after the peer exits: make sure what we opened is
    # one of our memfds and big enough, never some unrelated file we would scribble on.
    target = os.readlink(f"/proc/self/fd/{fd}")
    if not target.startswith(f"/memfd:{MEMFD_NAME} "):
        raise OSError(errno.EINVAL, f"{uri} is not a pdmesh KV pool (it is {target!r})")
    size = os.fstat(fd).st_size
    if size < nbytes:
        raise OSError(errno.EINVAL, f"{uri}: the pool has {size} bytes, the uri says {nbytes}")


def _byte_view(pool: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(pool, torch.Tensor) or pool.device.type != "cpu":
        raise ValueError(f"{what} must be a CPU tensor")
    if not pool.is_contiguous():
        raise ValueError(f"{what} must be contiguous (page p at p * bytes_per_page)")
    return pool.reshape(-1).view(torch.uint8)


def _check_bounds(pages: Sequence[int], bytes_per_page: int, flat: torch.Tensor,
                  what: str) -> None:
    if not isinstance(bytes_per_page, int) or bytes_per_page < 1:
        raise ValueError(f"bytes_per_page must be an int >= 1, got {bytes_per_page!r}")
    num_pages = flat.numel() // bytes_per_page
    if pages and max(pages) >= num_pages:
        raise ValueError(f"{what} names page {max(pages)} but the pool holds {num_pages} "
                         f"pages of {bytes_per_page} bytes")


def _prune() -> None:
    # Forget mappings that are gone, so their addresses can be reused by other tensors.
    for ptr in [p for p, (ref, _, _) in _POOLS.items() if ref() is None]:
        del _POOLS[ptr]
