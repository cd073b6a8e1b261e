"""CUDA IPC KV transfer: write KV pages straight into another process's pool on this GPU.

A decode worker exports its pool once (`export_pool` -> an "ipc:..." URI it publishes);
a prefill worker on the same host opens it (`open_peer`) and gets the peer's pool mapped
into its own address space, so moving pages is one device kernel (kernels/page_copy.py)
at device-copy bandwidth instead of a trip through a transfer engine. `open_peer` raises
ValueError for a malformed URI (or a local pool not on a GPU) and RuntimeError when the
peer's pool cannot be reached from here (another GPU, a handle the driver refuses): the
caller then falls back to Mooncake.

The handle is torch's own (UntypedStorage._share_cuda_ / _new_shared_cuda, the pair that
torch.multiprocessing uses), so the caching allocator's rules hold: the handle names the
whole cudaMalloc block, torch keeps one mapping per block per process, and the exporter's
block is not reused while an opened copy is alive (torch's IPC ref counter; a URI stands
for one such reference, so export once per opener). CUDA refuses to open a handle in the
process that made it, so there a URI resolves to the exported tensor itself.
"""
from __future__ import annotations

import operator
import os
import secrets
import threading
import time
import weakref
from typing import Any, Sequence

import torch

from pdmesh.transfer.base import TransferError, TransferStats
from pdmesh.transfer.ipc_uri import SHARE, VERSION, decode_uri, encode_uri
from pdmesh.transfer.plan import plan_runs, validate_pages

NAME = "ipc"

_TIMER_SLACK = 60e-6   # time.sleep wakes this late (Linux timer slack ~50 us)
_POLL = 20e-6          # between polls of the copy's event
_POLL_WINDOW = 2e-3    # polling past the prediction this long: block in the driver
_MAX_COPY_RUNS = 4     # up to this many page runs: copy_ per run instead of the kernel

_exports: "weakref.WeakValueDictionary[str, torch.Tensor]" = weakref.WeakValueDictionary()
# who exported: the pid alone is not enough (two containers can share a pid), and the
# token alone neither (a forked child keeps it), so both
_TOKEN = secrets.token_hex(8)


def _process_key() -> str:
    return f"{os.getpid()}:{_TOKEN}"


def _gpu_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _flat_bytes(pool: torch.Tensor, what: str) -> torch.Tensor:
    """The pool's memory as one uint8 vector (pages are slices of it)."""
    if not isinstance(pool, torch.Tensor) or not pool.is_contiguous() or pool.numel() == 0:
        raise ValueError(f"{what} must be a non-empty contiguous tensor")
    return pool.reshape(-1).view(torch.uint8)


def export_pool(pool: torch.Tensor) -> str | None:
    """URI a process on this host opens (open_peer) to write into `pool`; None for a pool
    not in GPU memory. `pool` must stay alive while peers use it, and must come from
    torch's caching allocator (any tensor torch allocated on the GPU does)."""
    flat = _flat_bytes(pool, "pool")
    if not flat.is_cuda:
        return None
    share = pool.untyped_storage()._share_cuda_()
    if len(share) != len(SHARE):  # the layout torch 2.x has kept; fail loudly if it moves
        raise RuntimeError(f"torch {torch.__version__}: _share_cuda_() gave {len(share)} "
                           f"values, this module reads {len(SHARE)}")
    export_id = secrets.token_hex(8)
    _exports[export_id] = pool
    info = dict(zip(SHARE, share))
    info.update(v=VERSION, proc=_process_key(), export=export_id,
                uuid=_gpu_uuid(pool.device.index), offset=pool.storage_offset() *
                pool.element_size(), nbytes=flat.numel())
    return encode_uri(info)


def open_peer(uri: str, local_pool: torch.Tensor) -> "IpcPeer":
    """Open the pool behind `uri` for writes from `local_pool` (this process's own pool,
    on the same GPU). ValueError: malformed URI or a local pool not on a GPU;
    RuntimeError: the peer's pool cannot be reached from here (fall back)."""
    info = decode_uri(uri)
    if not isinstance(local_pool, torch.Tensor) or not local_pool.is_cuda:
        raise ValueError("CUDA IPC needs the local pool in GPU memory")
    if info["proc"] == _process_key():  # our own export: no IPC at all
        return IpcPeer(_own_export(info), local_pool)
    index = local_pool.device.index
    if _gpu_uuid(index) != info["uuid"]:
        raise RuntimeError(f"peer pool is on GPU {info['uuid']}, the local pool on "
                           f"{_gpu_uuid(index)}: CUDA IPC here copies within one GPU")
    peer, storage = _open(info, index)
    return IpcPeer(peer, local_pool, opened=storage)


def _own_export(info: dict[str, Any]) -> torch.Tensor:
    """The tensor this process exported under `info` (a URI of ours: no IPC at all)."""
    pool = _exports.get(info["export"])
    if pool is None:
        raise RuntimeError("the pool this process exported under that URI is gone")
    # the opener holds the tensor itself, so give back the export's IPC reference now,
    # or the pool's block would wait in torch's IPC limbo forever once freed
    torch.UntypedStorage._release_ipc_counter_cuda(info["ref_counter"],
                                                   info["ref_counter_offset"])
    return pool


def _open(info: dict[str, Any], index: int) -> tuple[torch.Tensor, torch.UntypedStorage]:
    """(the exported bytes as a flat uint8 tensor on local GPU `index`, their storage)."""
    args = [info[k] for k in SHARE]
    args[0] = index  # the exporter's index of that GPU may differ (CUDA_VISIBLE_DEVICES)
    try:
        storage = torch.UntypedStorage._new_shared_cuda(*args)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/TypeError variants
        raise RuntimeError(f"cannot open the peer's CUDA IPC handle: {e}") from e
    flat = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", index))
    return flat.set_(storage, info["offset"], (info["nbytes"],)), storage


def open_pool(uri: str) -> torch.Tensor:
    """The pool behind `uri` as a flat uint8 tensor on whichever visible GPU holds it
    (any of this process's GPUs, unlike open_peer's same-GPU writes: a TP worker's rank 0
    maps its ranks' pools this way). RuntimeError when that GPU is not visible here."""
    info = decode_uri(uri)
    if info["proc"] == _process_key():
        return _flat_bytes(_own_export(info), "pool")
    index = next((i for i in range(torch.cuda.device_count())
                  if _gpu_uuid(i) == info["uuid"]), None)
    if index is None:
        raise RuntimeError(f"the pool's GPU {info['uuid']} is not visible in this process")
    return _open(info, index)[0]  # the tensor keeps its storage alive


def warm_up(pool: torch.Tensor) -> None:
    """Launch the page-copy kernel once over `pool`'s pages with no valid pair (ids -1,
    skipped on the device: nothing is read or written), as a transfer of more than
    _MAX_COPY_RUNS page runs launches it (pool to a same-sized peer: the same kernel
    specialisation). Its first launch in a process loads it: a 345 ms `kv.transfer`
    inside the first such request on an H200 (2026-12-02), 1.7 ms after. A page is
    pool[0]. Synchronous; an engine process runs it at start (core_process.py)."""
    from pdmesh.kernels.page_copy import copy_pages

    flat = _flat_bytes(pool, "pool")
    pages = _pages(flat, pool[0].numel() * pool.element_size(), "pool")
    ids = torch.full((2,), -1, dtype=torch.int64, device=flat.device)
    copy_pages(pages, pages, ids, ids)
    if flat.is_cuda:
        torch.cuda.synchronize(flat.device)


def _ids(pages: Sequence[int] | torch.Tensor, name: str, limit: int) -> list[int]:
    """Python ints (from a list, range, numpy array or tensor), each < limit (the pages of
    the pool they index); ValueError otherwise. Negative ids are validate_pages' to refuse."""
    try:
        ids = [operator.index(p) for p in (pages.tolist() if isinstance(pages, torch.Tensor)
                                           else pages)]
    except TypeError as e:
        raise ValueError(f"{name}: page ids must be integers ({e})") from None
    if ids and max(ids) >= limit:
        raise ValueError(f"{name} names pages past the {limit} of its pool: "
                         f"{sorted({p for p in ids if p >= limit})[:8]}")
    return ids


def _pages(flat: torch.Tensor, bytes_per_page: int, what: str) -> torch.Tensor:
    """flat viewed as [pages, bytes_per_page]; ValueError unless it divides evenly."""
    if not isinstance(bytes_per_page, int) or bytes_per_page <= 0:
        raise ValueError(f"bytes_per_page must be a positive int, got {bytes_per_page!r}")
    if flat.numel() % bytes_per_page:
        raise ValueError(f"{what} of {flat.numel()} bytes is no whole number of "
                         f"{bytes_per_page}-byte pages")
    return flat.view(-1, bytes_per_page)


class IpcPeer:
    """An opened peer pool: pages of the local pool are written into it by one kernel.
    Thread-safe (one copy at a time). Host pools work too (tests, TRITON_INTERPRET=1)."""

    name = NAME

    def __init__(self, peer_pool: torch.Tensor, local_pool: torch.Tensor,
                 opened: torch.UntypedStorage | None = None) -> None:
        from pdmesh.kernels.page_copy import copy_pages  # triton: only once a peer exists

        self._peer = _flat_bytes(peer_pool, "peer pool")
        self._local = _flat_bytes(local_pool, "local pool")
        if self._peer.device != self._local.device:
            raise RuntimeError(f"peer pool on {self._peer.device}, local on {self._local.device}")
        self._opened = opened  # holds the IPC mapping open; dropped by close()
        self._copy = copy_pages
        self._lock = threading.Lock()
        self._stream = self._done = None
        self._ids_host = self._ids_dev = None  # [2 * capacity] int64 staging, reused
        self._rate = 0.0  # fastest bytes/s seen: predicts how long to sleep (_wait)
        self.wait_mode = "hybrid"  # _wait: hybrid | sleep | spin | sync
        self.host_s = 0.0  # the last GPU call's host time from entry to launched
        if self._local.is_cuda:
            # own stream: a transfer never queues behind the engine's kernels; blocking
            # event: a long wait sleeps in the driver instead of spinning (_wait)
            self._stream = torch.cuda.Stream(self._local.device)
            self._done = torch.cuda.Event(blocking=True)

    def write_pages(self, src_pages: Sequence[int], dst_pages: Sequence[int],
                    bytes_per_page: int) -> TransferStats:
        """Local page src_pages[i] over the peer's page dst_pages[i], for every i; returns
        once the bytes are in the peer's memory. ValueError (nothing written) for bad ids
        or page size; TransferError once closed."""
        local, peer = self._views(bytes_per_page)
        src = _ids(src_pages, "src_pages", local.shape[0])
        dst = _ids(dst_pages, "dst_pages", peer.shape[0])
        validate_pages(src, dst)
        t0 = time.perf_counter()
        if src:
            self._run(local, peer, src, dst)
        return TransferStats(len(src) * bytes_per_page, 1 if src else 0,
                             time.perf_counter() - t0)

    def read_pages(self, peer_pages: Sequence[int], bytes_per_page: int) -> torch.Tensor:
        """A new uint8 tensor [n, bytes_per_page] (on the pools' device) holding the peer's
        pages peer_pages[i]: a probe; ids may repeat, nothing is written there."""
        _, peer = self._views(bytes_per_page)
        ids = _ids(peer_pages, "peer_pages", peer.shape[0])
        validate_pages(ids, list(range(len(ids))))
        out = torch.empty((len(ids), bytes_per_page), dtype=torch.uint8, device=peer.device)
        if ids:
            self._run(peer, out, ids, list(range(len(ids))))
        return out

    def poke(self, at: int, value: int) -> None:
        """Set the peer pool's byte `at` (the corrupt-KV chaos hook); synchronous."""
        with self._lock:
            peer = self._peer
            if peer is None:
                raise TransferError(-1, "use of a closed IpcPeer")
            if not 0 <= at < peer.numel():
                raise ValueError(f"byte {at} is outside the peer pool ({peer.numel()} bytes)")
            peer[at] = value
            if peer.is_cuda:
                torch.cuda.synchronize(peer.device)

    def close(self) -> None:
        """Drop the opened storage (torch unmaps the block and releases the exporter's
        reference once nothing here uses it). Idempotent; later calls raise TransferError."""
        with self._lock:
            self._peer = self._local = self._opened = None

    def __enter__(self) -> "IpcPeer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _views(self, bytes_per_page: int) -> tuple[torch.Tensor, torch.Tensor]:
        local, peer = self._local, self._peer
        if local is None or peer is None:
            raise TransferError(-1, "use of a closed IpcPeer")
        return (_pages(local, bytes_per_page, "local pool"),
                _pages(peer, bytes_per_page, "peer pool"))

    def _run(self, src: torch.Tensor, dst: torch.Tensor, s: list[int], d: list[int]) -> None:
        """Copy pages s[i] of src over pages d[i] of dst: a few page runs as copy_ (one
        cudaMemcpyAsync each, no ids to upload), else one copy_pages launch; on a GPU on
        this peer's stream, waited for by event (_wait)."""
        runs = plan_runs(s, d)
        with self._lock:
            t0 = time.perf_counter()
            if self._stream is None:
                self._launch(src, dst, s, d, runs)
                return
            dev = src.device
            with torch.cuda.device(dev):
                # the engine synchronised after the step that wrote the source pages; this
                # costs ~6 us and covers callers that did not
                self._stream.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(self._stream):
                    self._launch(src, dst, s, d, runs)
                    self._done.record(self._stream)
            launched = time.perf_counter()
            self.host_s = launched - t0
            self._wait(len(s) * src.shape[1], launched)

    def _launch(self, src: torch.Tensor, dst: torch.Tensor, s: list[int], d: list[int],
                runs: list[tuple[int, int, int]]) -> None:
        if len(runs) <= _MAX_COPY_RUNS:
            for a, b, n in runs:  # src, dst: [pages, bytes_per_page]
                dst[b:b + n].copy_(src[a:a + n], non_blocking=True)
            return
        n = len(s)
        if self._stream is None:
            ids = torch.tensor(s + d, dtype=torch.int64)
            self._copy(src, dst, ids[:n], ids[n:])
            return
        if self._ids_host is None or self._ids_host.numel() < 2 * n:
            cap = 2 * max(256, 1 << (n - 1).bit_length())
            # pinned: an async DMA (8 us); from pageable memory the upload took 78 us
            self._ids_host = torch.empty(cap, dtype=torch.int64, pin_memory=True)
            self._ids_dev = torch.empty(cap, dtype=torch.int64, device=src.device)
        host = self._ids_host.numpy()  # safe to refill: the last call's upload is done
        host[:n], host[n:2 * n] = s, d
        ids = self._ids_dev[:2 * n]
        ids.copy_(self._ids_host[:2 * n], non_blocking=True)
        self._copy(src, dst, ids[:n], ids[n:])

    def _wait(self, nbytes: int, launched: float) -> None:
        """Return once the copy is done, asleep (GIL released) through most of it.

        Not just self._done.synchronize(): on the (gVisor) H200 machine this was measured
        on, waking from the driver's blocking sync cost 120-250 us per 512 MiB copy over a
        spinning wait. So sleep on the host through the copy time predicted from the
        fastest rate seen so far, then poll the event for the tail (wait_mode "hybrid":
        back-to-back, a few tens of us; "sleep": time.sleep between polls), and block in
        the driver only if the copy runs far past the prediction (a busy GPU). wait_mode
        "sync" and "spin" are the two plain ways, kept for benchmarks/ipc_bench.py."""
        mode = self.wait_mode
        if mode == "sync":
            self._done.synchronize()
            return
        if self._rate and mode != "spin":
            ahead = 0.9 * nbytes / self._rate - _TIMER_SLACK
            if ahead > 0:
                time.sleep(ahead)
        give_up = time.perf_counter() + _POLL_WINDOW
        pause = _POLL if mode == "sleep" else 0.0
        while not self._done.query():
            if time.perf_counter() > give_up:
                self._done.synchronize()  # releases the GIL; cudaEventBlockingSync
                break
            if pause:
                time.sleep(pause)
        # launch-to-seen-done bounds the copy time from above, so the max rate approaches
        # the true one from below and the 0.9 x prediction does not sleep past the end
        self._rate = max(self._rate, nbytes / max(time.perf_counter() - launched, 1e-9))
