"""KV transport over the Mooncake transfer engine (pip: mooncake-transfer-engine*).

Facts about Mooncake's Python API this relies on (package 0.3.13):
- `TransferEngine().initialize(hostname, "P2PHANDSHAKE", protocol, device_name) -> int`,
  0 on success, well under a millisecond for tcp. With P2PHANDSHAKE there is no metadata
  server: the engine listens on an RPC port and a peer's session id is "host:rpc_port".
- `register_memory(ptr, length) -> int` (0 = ok). Over tcp only the *destination* side
  checks that addresses lie in registered memory, so we check the source side ourselves.
- `batch_transfer_sync_write(session, src_ptrs, dst_ptrs, lengths) -> int` blocks until
  done, releases the GIL, and may be called from several threads at once. An unreachable
  or dead peer fails fast (-1), it does not hang.
- Logging is glog, configured once at import from MC_LOG_LEVEL (TRACE/INFO/WARNING/ERROR);
  we default it to ERROR before the first import. Its INFO output is very chatty.
- Several engines per process work, and an engine may write into its own registered
  memory (session id = its own), so same-process transfers need no special path.
- Destroying an engine takes ~0.7 s (it unpublishes its segment).
- What listens, and where (0.3.13.post1, read in tcp_transport.cpp and seen with `ss`):
  the handshake RPC port binds 0.0.0.0 and the tcp data port [::] (dual stack), whatever
  `hostname` says (it only names us in the session id); neither can be restricted from
  the Python API, and neither authenticates a peer: the data port's protocol is a raw
  (address, length, read|write) header, so whoever reaches it can read or write any
  address of the process. Hence the warning at start: keep these ports on a private
  network (or firewalled to mesh members); pdmesh's TLS covers gRPC only. Read again at
  tag v0.3.12.post1 and on main of 2026-08: the handshake listener (SocketHandShakePlugin
  startDaemon) and findAvailableTcpPort bind INADDR_ANY / IN6ADDR_ANY, the data port's
  TcpContext binds tcp::v6() dual stack; MC_TCP_BIND_ADDRESS is read only without
  P2PHANDSHAKE (a metadata server), and there it names the advertised address, not the
  bind. So a worker cannot bind these to its --host: pdmesh starts the engine only when
  a peer on another host needs it (pdmesh.transfer.lazy), and a single-host mesh opens none.

Waiting without spinning (read in transfer_engine_py.cpp; the functions named below are
the same at tag v0.3.12.post1 and on main after 0.3.13, line numbers are v0.3.12.post1's):
- `batch_transfer_sync_write/_read` (batchTransferSync, l. 524-627) submit one batch and
  then loop on the engine's non-blocking getBatchTransferStatus with no sleep (l. 596-626):
  the calling thread burns a core for the whole transfer.
- `batch_transfer_async_write/_read(session, bufs, peer_addrs, lengths) -> batch id`
  (batchTransferAsync, l. 629-693) returns after submitting; the id is the address of the
  engine's BatchDesc, and 0 means not submitted (segment did not open, bad arguments or
  submitTransfer refused, l. 642-644, 684-687), with no reason given.
- `get_batch_transfer_status([ids]) -> 0 | -1` (l. 695-753) blocks until every batch is
  done, failed, or past its timeout, in the same sleepless loop (l. 717): no better.
- `transfer_check_status(id)` (l. 793-809) polls once without blocking: 0 pending,
  1 done, -1 failed (both free the batch: never ask about that id again, the address is
  reused), -2 timed out (MC_SLICE_TIMEOUT, off by default; not freed). It looks at task 0
  only, so for a batch of several descriptors it says "done" (and frees the batch) while
  the others are still moving (seen: 100 of 200 pages had landed). Hence one batch per
  descriptor here, polled in order with sleeps (`_wait`).
- A dead or unreachable peer fails fast on the async path too (id 0 at once, or -1
  within milliseconds). Sync calls give up after MC_TRANSFER_TIMEOUT (default 30 s, at
  least 5) plus 1 ns per byte; `_wait` keeps the same deadline.
- Measured (benchmarks/transfer_bench.py, tcp loopback, 2-core VM): the async writes
  run at 1.1-1.5x the sync call's GB/s from 8 pages up, for half its writer CPU per GB;
  a single 737 KB page takes ~240 us against ~210 us (a sleeping waiter wakes late).
"""
from __future__ import annotations

import ctypes
import os
import threading
import time
import logging
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from pdmesh.transfer.base import TransferError, TransferStats, Transport
from pdmesh.transfer.lazy import engine_session
from pdmesh.transfer.plan import plan_runs, runs_to_descriptors, validate_pages


# How a waiting thread polls an async batch: it sleeps POLL_FRACTION of the time since
# submission (so it notices completion at most ~1/8 late, plus wake-up latency), at least
# POLL_MIN_S, at most POLL_MAX_S. Tried on tcp loopback: shorter sleeps or more frequent
# polls did not make one-page writes faster (the polls compete with the engine's threads).
POLL_MIN_S = 20e-6
POLL_MAX_S = 1e-3
POLL_FRACTION = 0.125
# While waiting, the thread's timer slack (default 50 us, which makes sleep(20e-6) last
# ~90 us) is lowered to this, then restored: a one-page write takes ~200 us over tcp.
TIMER_SLACK_NS = 1_000
WRITE_APIS = ("async", "sync")

INSTALL = ("pip install mooncake-transfer-engine-non-cuda (CPU) or "
           "mooncake-transfer-engine-cuda13 (CUDA 13), and apt-get install libibverbs1")


class MooncakeUnavailable(ImportError):
    """mooncake.engine does not import here; str() is one line saying what to install."""


log = logging.getLogger(__name__)
_warned = False


def _warn_open_ports(rpc_port: int) -> None:
    """Once per process: Mooncake's ports are open to every interface, unauthenticated."""
    global _warned
    if not _warned:
        _warned = True
        log.warning("Mooncake transfer engine started: it listens on all interfaces "
                    "(handshake port %d and a data port) and authenticates no peer: keep "
                    "them on a private network or firewalled to mesh members (see README, "
                    "Security)", rpc_port)


def unavailable_message(e: BaseException) -> str:
    """One line for why `import mooncake.engine` failed with `e`, naming the fix."""
    text = " ".join(str(e).split())
    if "libibverbs" in text:  # the extension links libibverbs.so.1, loaded even for tcp
        return ("the Mooncake transfer engine cannot load libibverbs (the RDMA verbs library, "
                f"needed even for tcp): apt-get install libibverbs1 ({text})")
    if isinstance(e, ModuleNotFoundError) and (e.name or "mooncake").startswith("mooncake"):
        return f"the Mooncake transfer engine is not installed: {INSTALL}"
    return f"the Mooncake transfer engine does not import ({text}): {INSTALL}"


def _import_engine() -> Any:
    # Must be set before mooncake.engine is first imported; a value already set wins.
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    try:
        from mooncake.engine import TransferEngine
    except (ImportError, OSError) as e:  # package missing, or libibverbs.so.1 not installed
        raise MooncakeUnavailable(unavailable_message(e)) from e
    return TransferEngine


def check_available() -> None:
    """Raise MooncakeUnavailable unless the transfer engine imports (cheap, no engine made)."""
    _import_engine()


_LINKS_CUDA: bool | None = None


def _engine_links_cuda() -> bool:
    global _LINKS_CUDA
    if _LINKS_CUDA is None:
        try:
            _import_engine()
            import mooncake.engine as eng

            with open(eng.__file__, "rb") as f:
                _LINKS_CUDA = b"libcudart.so" in f.read()
        except (ImportError, OSError, AttributeError):
            _LINKS_CUDA = False
    return _LINKS_CUDA


def _transfer_timeout_s(nbytes: int) -> float:
    """How long Mooncake's own sync calls wait for `nbytes`: MC_TRANSFER_TIMEOUT seconds
    (default 30, at least 5, read like atoi) plus 1 ns per byte."""
    raw = os.environ.get("MC_TRANSFER_TIMEOUT")
    if raw is None:
        seconds = 30
    else:
        digits = raw.strip()
        sign = -1 if digits.startswith("-") else 1
        digits = digits.lstrip("+-")
        n = len(digits) - len(digits.lstrip("0123456789"))
        seconds = max(5, sign * int(digits[:n] or 0))
    return seconds + nbytes * 1e-9


_PR_SET_TIMERSLACK, _PR_GET_TIMERSLACK = 29, 30
_prctl: Any = None


@contextmanager
def _fine_timer_slack() -> Iterator[None]:
    """Lower the calling thread's timer slack to TIMER_SLACK_NS for the block (Linux;
    elsewhere, or if prctl fails, a no-op). Only this thread's sleeps are affected."""
    global _prctl
    if _prctl is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).prctl
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
            _prctl = fn
        except (OSError, AttributeError):
            _prctl = False
    old = _prctl(_PR_GET_TIMERSLACK, 0, 0, 0, 0) if _prctl else -1
    changed = old > TIMER_SLACK_NS and _prctl(_PR_SET_TIMERSLACK, TIMER_SLACK_NS, 0, 0, 0) == 0
    try:
        yield
    finally:
        if changed:
            _prctl(_PR_SET_TIMERSLACK, old, 0, 0, 0)


class MooncakeTransport(Transport):
    """One Mooncake TransferEngine, P2P handshake (no metadata server).

    protocol: "tcp" (any machine) or "rdma" (needs RDMA NICs; untested here).
    device_name: for rdma, the HCAs to use, e.g. "mlx5_0,mlx5_1" or a list of names;
    "" lets Mooncake discover them. Ignored by tcp.
    hostname: the address peers reach this worker at; it becomes part of session_id.
    write_api: "async" (default: submit, then sleep-poll until done, see the module doc)
    or "sync" (Mooncake's batch_transfer_sync_write, which spins a core while it waits;
    kept for comparison, e.g. benchmarks/transfer_bench.py).
    """

    name = "mooncake"
    check_available = staticmethod(check_available)  # what pdmesh.transfer.check_transport calls

    def __init__(self, hostname: str = "127.0.0.1", protocol: str = "tcp",
                 device_name: str | Sequence[str] = "", metadata_server: str = "P2PHANDSHAKE",
                 write_api: str = "async"):
        if protocol not in ("tcp", "rdma"):
            raise ValueError(f"protocol must be 'tcp' or 'rdma', got {protocol!r}")
        if write_api not in WRITE_APIS:
            raise ValueError(f"write_api must be 'async' or 'sync', got {write_api!r}")
        if not isinstance(device_name, str):
            device_name = ",".join(device_name)
        self.hostname, self.protocol, self.write_api = hostname, protocol, write_api
        self._engine = _import_engine()()
        rc = self._engine.initialize(hostname, metadata_server, protocol, device_name)
        if rc != 0:
            raise TransferError(rc, f"initialize({hostname!r}, {metadata_server!r}, "
                                    f"{protocol!r}, {device_name!r})")
        self.session_id = f"{hostname}:{self._engine.get_rpc_port()}"
        _warn_open_ports(self._engine.get_rpc_port())
        self._regions: dict[int, tuple[int, Any]] = {}  # base ptr -> (nbytes, tensor kept alive)
        self._lock = threading.Lock()  # guards _regions, _scratch and _engine against close()
        self._scratch: Any = None  # read_pages' registered landing buffer (uint8 tensor)
        self._read_lock = threading.Lock()  # one read_pages at a time owns _scratch

    @staticmethod
    def reaches_gpu_memory() -> bool:
        """Whether this Mooncake build can read/write CUDA memory (a CUDA build links
        libcudart; the non-CUDA build would treat a device address as host memory)."""
        return _engine_links_cuda()

    def register(self, tensor: Any) -> int:
        """Register a contiguous tensor's bytes; returns its base pointer (idempotent per tensor)."""
        if not tensor.is_contiguous():
            raise ValueError("only contiguous tensors can be registered")
        ptr, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        with self._lock:
            engine = self._live()
            if ptr in self._regions:
                return ptr
            rc = engine.register_memory(ptr, nbytes)
            if rc != 0:
                raise TransferError(rc, f"register_memory({ptr:#x}, {nbytes})")
            self._regions[ptr] = (nbytes, tensor)
        return ptr

    def write_pages(self, dst_session: str, src_base: int, dst_base: int, bytes_per_page: int,
                    src_pages: Sequence[int], dst_pages: Sequence[int]) -> TransferStats:
        """Write local pages into `dst_session`'s pages, one descriptor per consecutive run.

        Thread-safe; blocks until done, sleeping (write_api "async") rather than spinning,
        without the GIL. Raises ValueError for bad page lists or a source range outside
        registered memory, TransferError if Mooncake fails.
        """
        if bytes_per_page < 1:
            raise ValueError(f"bytes_per_page must be >= 1, got {bytes_per_page}")
        validate_pages(src_pages, dst_pages)
        if not src_pages:
            return TransferStats(0, 0, 0.0)
        dst_session = engine_session(dst_session)  # a published id's nonce is not Mooncake's
        runs = plan_runs(src_pages, dst_pages)
        src, dst, lengths = runs_to_descriptors(runs, src_base, dst_base, bytes_per_page)
        engine = self._live()
        self._check_source(src, lengths)
        t0 = time.perf_counter()
        if self.write_api == "sync":
            rc, api = engine.batch_transfer_sync_write(dst_session, src, dst, lengths), \
                "batch_transfer_sync_write"
        else:
            rc, api = self._transfer(engine, "write", dst_session, src, dst, lengths, t0)
        seconds = time.perf_counter() - t0
        if rc != 0:
            raise TransferError(rc, f"{api} to {dst_session} ({len(runs)} descriptors, "
                                    f"{sum(lengths)} bytes, {len(src_pages)} pages)")
        return TransferStats(bytes=sum(lengths), descriptors=len(runs), seconds=seconds)

    def read_pages(self, peer_session: str, peer_base: int, bytes_per_page: int,
                   peer_pages: Sequence[int]) -> Any:
        """The peer's pages peer_pages[i] (ids may repeat), as a new uint8 tensor
        [len(peer_pages), bytes_per_page] (for probes: one-sided reads, the peer's memory
        is only ever the source).

        The bytes land in a scratch buffer this transport registers on first use and
        re-registers, sized to the request, when a request needs more; reads take turns
        on it (thread-safe, one at a time). Blocks sleeping, like write_pages. Raises
        ValueError for bad arguments, TransferError if Mooncake fails (e.g. a page outside
        the peer's registered memory).
        """
        import torch

        if bytes_per_page < 1:
            raise ValueError(f"bytes_per_page must be >= 1, got {bytes_per_page}")
        pages = list(peer_pages)
        rows = list(range(len(pages)))
        validate_pages(pages, rows)  # peer ids play the source: repeats are fine
        if not pages:
            return torch.empty(0, bytes_per_page, dtype=torch.uint8)
        peer_session = engine_session(peer_session)
        runs = plan_runs(pages, rows)
        nbytes = len(pages) * bytes_per_page
        with self._read_lock:
            engine, scratch = self._scratch_for(nbytes)
            remote, local, lengths = runs_to_descriptors(runs, peer_base, scratch.data_ptr(),
                                                         bytes_per_page)
            rc, api = self._transfer(engine, "read", peer_session, local, remote, lengths,
                                     time.perf_counter())
            if rc != 0:
                raise TransferError(rc, f"{api} from {peer_session} ({len(runs)} descriptors, "
                                        f"{nbytes} bytes, {len(pages)} pages)")
            return scratch[:nbytes].view(len(pages), bytes_per_page).clone()

    def write_bytes(self, peer_session: str, peer_addr: int, data: bytes) -> None:
        """Write `data` at the peer's address `peer_addr` (registered there) from the read
        scratch (the corrupt-KV chaos hook: it never writes from a pool this worker's
        engine reads). Blocks; TransferError if Mooncake fails."""
        import torch

        with self._read_lock:
            engine, scratch = self._scratch_for(len(data))
            scratch[:len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            rc, api = self._transfer(engine, "write", engine_session(peer_session),
                                     [scratch.data_ptr()], [peer_addr], [len(data)],
                                     time.perf_counter())
        if rc != 0:
            raise TransferError(rc, f"{api} of {len(data)} bytes to {peer_session}")

    def close(self) -> None:
        """Unregister all memory and destroy the engine (~0.7 s). Idempotent; call it only
        when no write_pages or read_pages is in flight."""
        with self._lock:
            engine, self._engine = self._engine, None
            if engine is None:
                return
            for ptr in self._regions:
                engine.unregister_memory(ptr)  # best effort: the engine goes away anyway
            self._regions.clear()
            if self._scratch is not None:
                engine.unregister_memory(self._scratch.data_ptr())
                self._scratch = None
        del engine

    def _live(self) -> Any:
        if self._engine is None:
            raise TransferError(-1, f"use of closed MooncakeTransport {self.session_id}")
        return self._engine

    def _check_source(self, src: list[int], lengths: list[int]) -> None:
        # Over tcp Mooncake would read any address we give it; refuse what we did not register.
        regions = list(self._regions.items())
        for addr, n in zip(src, lengths):
            if not any(b <= addr and addr + n <= b + size for b, (size, _) in regions):
                raise ValueError(f"source range [{addr:#x}, +{n}) is not in registered memory")

    def _scratch_for(self, nbytes: int) -> tuple[Any, Any]:
        """(engine, registered uint8 scratch of >= nbytes); caller holds _read_lock."""
        import torch

        with self._lock:
            engine = self._live()
            if self._scratch is None or self._scratch.numel() < nbytes:
                if self._scratch is not None:
                    engine.unregister_memory(self._scratch.data_ptr())
                    self._scratch = None
                scratch = torch.empty(nbytes, dtype=torch.uint8)
                rc = engine.register_memory(scratch.data_ptr(), nbytes)
                if rc != 0:
                    raise TransferError(rc, f"register_memory({scratch.data_ptr():#x}, "
                                            f"{nbytes}) for read_pages")
                self._scratch = scratch
            return engine, self._scratch

    def _transfer(self, engine: Any, op: str, session: str, local: list[int],
                  remote: list[int], lengths: list[int], t0: float) -> tuple[int, str]:
        """Move the descriptors (op "write": local -> remote, "read": remote -> local) as
        one async batch each, then wait; returns (rc, name of the call that decided rc).

        If a submission is refused (batch id 0, which carries no reason), the batches
        already in flight are waited for and the remaining descriptors go through the
        sync call once: it reports Mooncake's return code, and on a broken segment makes
        the engine drop its cached handle (batchTransferSync does, batchTransferAsync
        does not), so a restarted peer is reached afresh.
        """
        submit = getattr(engine, f"batch_transfer_async_{op}")
        deadline = t0 + _transfer_timeout_s(sum(lengths))
        ids: list[int] = []
        for loc, rem, n in zip(local, remote, lengths):
            bid = submit(session, [loc], [rem], [n])
            if not bid:
                break
            ids.append(bid)
        rc = self._wait(engine, ids, t0, deadline)
        api = f"batch_transfer_async_{op}"
        if rc == 0 and len(ids) < len(lengths):
            k = len(ids)
            api = f"batch_transfer_sync_{op}"
            rc = getattr(engine, api)(session, local[k:], remote[k:], lengths[k:])
        return rc, api

    @staticmethod
    def _wait(engine: Any, ids: list[int], t0: float, deadline: float) -> int:
        """Poll the single-descriptor batches `ids` in order until each has finished,
        sleeping between polls (module doc); 0 if all completed, else the first failure's
        code (-1 failed, -2 timed out) or -1 past `deadline`. Failed batches do not stop
        the wait for the others, so none is left moving bytes when this returns (unless
        the deadline passed: then the unfinished ones are abandoned, as Mooncake's own
        sync call does)."""
        rc, i = 0, 0
        if not ids:
            return rc
        with _fine_timer_slack():
            while i < len(ids):
                status = engine.transfer_check_status(ids[i])
                if status == 0:
                    now = time.perf_counter()
                    if now > deadline:
                        return rc or -1
                    time.sleep(min(POLL_MAX_S, max(POLL_MIN_S, (now - t0) * POLL_FRACTION)))
                    continue
                if status != 1 and rc == 0:
                    rc = status
                i += 1  # finished either way; its id is freed (or, -2, abandoned)
        return rc
