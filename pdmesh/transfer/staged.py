"""KV transfer modes for a pool in GPU memory, and the transport that stages through host.

Modes (WorkerConfig.kv_transfer_mode, env PDMESH_KV_TRANSFER_MODE):
  direct  the device pool itself is registered; the engine reads/writes GPU memory
          (Mooncake's CUDA build: tcp copies through cudaMemcpy, rdma needs GPUDirect)
  staged  a pinned host mirror of the pool is registered (pdmesh.transfer.mirror, owned
          by the StagedTransport); the sender copies its pages device -> mirror before
          each write, the receiver copies them mirror -> device (`land`) before it
          adopts the request
  auto    direct when the pool is on a GPU and the engine can reach GPU memory, else
          staged; a pool in host memory is registered as it is ("host")
Each worker picks its own mode; any pair interoperates, since a writer only ever touches
its own registered memory and the peer's.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from pdmesh.transfer.base import TransferStats, Transport

log = logging.getLogger(__name__)
MODES = ("auto", "direct", "staged")


def choose_mode(requested: str, pool_on_gpu: bool, engine_reaches_gpu: bool) -> str:
    """The mode that runs: "direct", "staged" or "host" (pool already in host memory).

    Raises ValueError for "direct" with a GPU pool the engine cannot reach (it would read
    device addresses as host memory)."""
    if requested not in MODES:
        raise ValueError(f"kv transfer mode must be one of {', '.join(MODES)}, got {requested!r}")
    if not pool_on_gpu:
        return "staged" if requested == "staged" else "host"
    if requested == "direct" and not engine_reaches_gpu:
        raise ValueError("kv transfer mode 'direct' needs a transfer engine built with CUDA "
                         "(pip install mooncake-transfer-engine-cuda13); use 'staged' or 'auto'")
    if requested == "auto":
        return "direct" if engine_reaches_gpu else "staged"
    return requested


class StagedTransport(Transport):
    """Wraps a transport; registers a host mirror of each pool instead of the pool."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.session_id = inner.session_id
        self._mirrors: dict[int, Any] = {}  # registered (mirror) base -> KVMirror

    def register(self, tensor: Any) -> int:
        """Register `tensor`'s host mirror; returns the mirror's base (publish that one)."""
        from pdmesh.transfer.mirror import KVMirror

        m = KVMirror(tensor)
        base = self.inner.register(m.host)
        self._mirrors[base] = m
        return base

    def land(self, pages: Sequence[int]) -> None:
        """Pages written into this worker's mirror: copy them mirror -> pool (every
        registered pool; a worker registers one)."""
        for m in self._mirrors.values():
            m.to_device(list(pages))

    def write_pages(self, dst_session: str, src_base: int, dst_base: int, bytes_per_page: int,
                    src_pages: Sequence[int], dst_pages: Sequence[int]) -> TransferStats:
        """Copy src_pages device -> mirror, then write mirror pages into the peer's pool."""
        m = self._mirrors.get(src_base)
        if m is None:
            raise ValueError(f"source base {src_base:#x} is not a pool registered here")
        m.to_host(list(src_pages))
        return self.inner.write_pages(dst_session, src_base, dst_base, bytes_per_page,
                                      src_pages, dst_pages)

    def write_bytes(self, dst_session: str, dst_addr: int, data: bytes) -> None:
        """As the inner transport's (the peer's registered memory is its mirror)."""
        self.inner.write_bytes(dst_session, dst_addr, data)

    def close(self) -> None:
        self.inner.close()
        self._mirrors.clear()


def make_kv_transport(name: str, pool: Any, mode: str = "auto", lazy: bool = False,
                      **kwargs: Any) -> tuple[Transport, int, str]:
    """Build transport `name`, register `pool` for `mode`; -> (transport, base, mode run).

    lazy: return a pdmesh.transfer.lazy.LazyTransport that builds and registers on first
    use or `start()` (no engine, no port until then; the base returned is the pool's own
    until it starts). kwargs go to the transport's constructor (hostname, protocol,
    device_name)."""
    from pdmesh.transfer import get_transport

    factory = get_transport(name)
    on_gpu = getattr(pool, "is_cuda", False)
    reaches = bool(on_gpu and getattr(factory, "reaches_gpu_memory", lambda: False)())
    run = choose_mode(mode, on_gpu, reaches)

    def build() -> tuple[Transport, int]:
        transport = factory(**kwargs)
        if run == "staged":
            transport = StagedTransport(transport)
        base = transport.register(pool)
        log.info("KV transfer: %s (%s pool, mode requested %s)", describe(run, kwargs),
                 "GPU" if on_gpu else "host", mode)
        return transport, base

    if lazy:
        from pdmesh.transfer.lazy import LazyTransport

        getattr(factory, "check_available", lambda: None)()  # fail at start, not later
        return LazyTransport(build, kwargs.get("hostname", "127.0.0.1"),
                             pool.data_ptr()), pool.data_ptr(), run
    return (*build(), run)


def describe(run: str, kwargs: dict) -> str:
    what = {"direct": "GPU memory registered directly",
            "staged": "staged through a host mirror (pinned for a GPU pool)",
            "host": "host memory"}[run]
    return f"{kwargs.get('protocol', 'tcp')}, {what}"
