"""A KV transport whose transfer engine starts only when a peer needs it.

Mooncake's ports listen on every interface and authenticate no peer (mooncake_transport
module doc), so a worker opens them only when some KV must cross them: on one host the
bytes move by shared memory or CUDA IPC (route.py) and the engine never starts.

Session ids: a worker publishes `host:0#nonce` until its engine runs, then
`host:rpc_port#nonce` (port 0 = not started). The part after `#` names the worker for
the life of its process (`peer_key`), so routes and registry departures match whatever
the port part says; it is cut off before an id reaches Mooncake (`engine_session`, also
applied by MooncakeTransport itself). An id without `#` (a MooncakeTransport used alone:
tests, benchmarks) is its own key.

Who starts it (docs/architecture.md, "Transfer engine on demand"):
- a prefill, on its first write or read through the engine (`Router` binds the engine
  route only for a destination on another host, with no same-host path, or forced);
- a decode, before asking a prefill for KV, unless that prefill is on its host and both
  have a same-host path (`needs_engine`); it then sends the started session and base;
- any worker at start with TP ranks or no same-host path to offer (`--kv-path mooncake`
  offers none: every peer then writes through the engine, so a decode starts it for all).
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any, Callable, Sequence

from pdmesh.transfer.base import TransferError, TransferStats, Transport
from pdmesh.transfer.ipc_uri import pool_gpu

log = logging.getLogger(__name__)
SEP = "#"


def engine_session(session_id: str) -> str:
    """The Mooncake session in a published id (`host:port`, the nonce cut off)."""
    return session_id.partition(SEP)[0]


def peer_key(session_id: str) -> str:
    """What names a worker's pool for its whole life, whether its engine runs or not."""
    head, sep, nonce = session_id.partition(SEP)
    return nonce if sep else head


def engine_started(session_id: str) -> bool:
    """False for a published id whose engine has not started (port 0)."""
    return not engine_session(session_id).endswith(":0")


def needs_engine(my_host: str, my_local: Sequence[str], peer_host: str | None,
                 peer_local: Sequence[str]) -> bool:
    """Whether a decode must run its engine before prefill `peer` writes into it: unless
    the peer is known to be on this host and a same-host path opens between the two pools
    (`shared_local_path`; a TP worker offers none: its writes always go through the
    engine). Unknown peers: yes. `my_local`, `peer_local`: each side's published URIs."""
    return not (peer_host is not None and peer_host == my_host
                and shared_local_path(my_local, peer_local))


def shared_local_path(mine: Sequence[str], theirs: Sequence[str]) -> bool:
    """Whether some same-host path opens between two pools: a kind both publish, and for
    CUDA IPC the same GPU (cuda_ipc copies within one GPU; pools on two GPUs of a host,
    `pdmesh serve --gpus 0,1`, go through the engine)."""
    for a in mine:
        for b in theirs:
            kind = a.partition(":")[0]
            if kind != b.partition(":")[0]:
                continue
            if kind != "ipc" or pool_gpu(a) == pool_gpu(b) is not None:
                return True
    return False


class LazyTransport(Transport):
    """A Transport that builds the real one (`start_fn() -> (transport, registered
    base)`) on first use or on `start()`. Thread-safe; `base` is the pool base published
    before start (the pool itself), remapped to the registered base for writes."""

    def __init__(self, start_fn: Callable[[], tuple[Transport, int]], hostname: str,
                 base: int) -> None:
        self._start_fn, self._published = start_fn, base
        self._nonce = secrets.token_hex(6)
        self.session_id = f"{hostname}:0{SEP}{self._nonce}"
        self.base = base  # the registered base once started (a staged pool's mirror)
        self.start_seconds: float | None = None
        self._inner: Transport | None = None
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        return self._inner is not None

    def start(self, reason: str = "first use") -> tuple[str, int]:
        """Start the engine and register the pool once; -> (session id, pool base)."""
        self._live(reason)
        return self.session_id, self.base

    def _live(self, reason: str = "first use") -> Transport:
        if self._inner is not None:
            return self._inner
        with self._lock:
            if self._inner is None:
                t0 = time.perf_counter()
                inner, self.base = self._start_fn()
                self.session_id = f"{inner.session_id}{SEP}{self._nonce}"
                self.start_seconds = time.perf_counter() - t0
                self._inner = inner
                print(f"KV transfer engine started ({reason}) in "
                      f"{self.start_seconds * 1e3:.1f} ms: session "
                      f"{engine_session(self.session_id)}", flush=True)
        return self._inner

    def register(self, tensor: Any) -> int:
        return self._live("a buffer to register").register(tensor)

    def _src(self, src_base: int) -> int:
        return self.base if src_base == self._published else src_base

    def write_pages(self, dst_session: str, src_base: int, dst_base: int, bytes_per_page: int,
                    src_pages: Sequence[int], dst_pages: Sequence[int]) -> TransferStats:
        _check_peer(dst_session)
        inner = self._live(f"a write to {engine_session(dst_session)}")
        return inner.write_pages(engine_session(dst_session), self._src(src_base), dst_base,
                                 bytes_per_page, src_pages, dst_pages)

    def read_pages(self, peer_session: str, peer_base: int, bytes_per_page: int,
                   peer_pages: Sequence[int]) -> Any:
        """As MooncakeTransport.read_pages; NotImplementedError for a staged transport."""
        _check_peer(peer_session)
        inner = self._live(f"a read from {engine_session(peer_session)}")
        read = getattr(inner, "read_pages", None)
        if read is None:
            raise NotImplementedError(f"{type(inner).__name__} cannot read pages")
        return read(engine_session(peer_session), peer_base, bytes_per_page, peer_pages)

    def write_bytes(self, dst_session: str, dst_addr: int, data: bytes) -> None:
        """As MooncakeTransport.write_bytes (the corrupt-KV chaos hook)."""
        _check_peer(dst_session)
        self._live(f"a write to {engine_session(dst_session)}").write_bytes(
            engine_session(dst_session), dst_addr, data)

    def land(self, pages: Sequence[int]) -> None:
        """Staged pages written by the engine: mirror -> pool (nothing before start)."""
        land = getattr(self._inner, "land", None)
        if land is not None:
            land(pages)

    def close(self) -> None:
        with self._lock:
            inner, self._inner = self._inner, None
        if inner is not None:
            inner.close()


def _check_peer(session_id: str) -> None:
    if not engine_started(session_id):
        raise TransferError(-1, f"the transfer engine of {session_id} is not started (a "
                                "worker starts it for peers on other hosts): no same-host "
                                "path reached it; --kv-path mooncake starts it at once")
