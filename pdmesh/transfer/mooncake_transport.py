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
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Sequence

from pdmesh.transfer.base import TransferError, TransferStats, Transport
from pdmesh.transfer.plan import plan_runs, runs_to_descriptors, validate_pages


INSTALL = ("pip install mooncake-transfer-engine-non-cuda (CPU) or "
           "mooncake-transfer-engine-cuda13 (CUDA 13), and apt-get install libibverbs1")


class MooncakeUnavailable(ImportError):
    """mooncake.engine does not import here; str() is one line saying what to install."""


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


class MooncakeTransport(Transport):
    """One Mooncake TransferEngine, P2P handshake (no metadata server).

    protocol: "tcp" (any machine) or "rdma" (needs RDMA NICs; untested here).
    device_name: for rdma, the HCAs to use, e.g. "mlx5_0,mlx5_1" or a list of names;
    "" lets Mooncake discover them. Ignored by tcp.
    hostname: the address peers reach this worker at; it becomes part of session_id.
    """

    check_available = staticmethod(check_available)  # what pdmesh.transfer.check_transport calls

    def __init__(self, hostname: str = "127.0.0.1", protocol: str = "tcp",
                 device_name: str | Sequence[str] = "", metadata_server: str = "P2PHANDSHAKE"):
        if protocol not in ("tcp", "rdma"):
            raise ValueError(f"protocol must be 'tcp' or 'rdma', got {protocol!r}")
        if not isinstance(device_name, str):
            device_name = ",".join(device_name)
        self.hostname, self.protocol = hostname, protocol
        self._engine = _import_engine()()
        rc = self._engine.initialize(hostname, metadata_server, protocol, device_name)
        if rc != 0:
            raise TransferError(rc, f"initialize({hostname!r}, {metadata_server!r}, "
                                    f"{protocol!r}, {device_name!r})")
        self.session_id = f"{hostname}:{self._engine.get_rpc_port()}"
        self._regions: dict[int, tuple[int, Any]] = {}  # base ptr -> (nbytes, tensor kept alive)
        self._lock = threading.Lock()  # guards _regions and _engine against close()

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

        Thread-safe; blocks (without the GIL) until done. Raises ValueError for bad page
        lists or a source range outside registered memory, TransferError if Mooncake fails.
        """
        if bytes_per_page < 1:
            raise ValueError(f"bytes_per_page must be >= 1, got {bytes_per_page}")
        validate_pages(src_pages, dst_pages)
        if not src_pages:
            return TransferStats(0, 0, 0.0)
        runs = plan_runs(src_pages, dst_pages)
        src, dst, lengths = runs_to_descriptors(runs, src_base, dst_base, bytes_per_page)
        engine = self._live()
        self._check_source(src, lengths)
        t0 = time.perf_counter()
        rc = engine.batch_transfer_sync_write(dst_session, src, dst, lengths)
        seconds = time.perf_counter() - t0
        if rc != 0:
            raise TransferError(rc, f"batch_transfer_sync_write to {dst_session} "
                                    f"({len(runs)} descriptors, {sum(lengths)} bytes, "
                                    f"{len(src_pages)} pages)")
        return TransferStats(bytes=sum(lengths), descriptors=len(runs), seconds=seconds)

    def close(self) -> None:
        """Unregister all memory and destroy the engine (~0.7 s). Idempotent; call it only
        when no write_pages is in flight."""
        with self._lock:
            engine, self._engine = self._engine, None
            if engine is None:
                return
            for ptr in self._regions:
                engine.unregister_memory(ptr)  # best effort: the engine goes away anyway
            self._regions.clear()
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
