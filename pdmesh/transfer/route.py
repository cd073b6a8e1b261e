"""Which path a prefill's KV takes into each decode pool: chosen once per pair, by measurement.

Paths, fastest first on the machines measured (benchmarks/results/):
  ipc       CUDA IPC: the decode's GPU pool opened in the prefill process, pages copied
            by one kernel on the prefill's GPU (pdmesh.transfer.cuda_ipc)
  shm       the decode's host pool lives in shared memory (a memfd); the prefill maps it
            and copies pages into it (pdmesh.transfer.shm)
  mooncake  the transfer engine (rdma across hosts, tcp anywhere): always available
A local path needs both workers on one host (equal `host_id`) and a pool it can export.
The transfer engine may not be running on either side (pdmesh.transfer.lazy): a pair
with a same-host path that opens does not start it.

When a prefill first writes to a decode (the pair *binds*), every candidate path that
opens is timed reading a few of the room's destination pages (a read never disturbs the
peer); local paths must read the same bytes as the transfer engine, or they do not reach
the same memory and are dropped (when both engines run; otherwise the local paths alone
are timed, and the decode's checksum is what catches one that reached other memory).
The fastest wins, is logged, and is the `path` label of
the transfer metrics and the `kv.transfer` span. `path` forces one (falls back to the
transfer engine, with a log line, where it does not open).
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from pdmesh.transfer.base import TransferStats
from pdmesh.transfer.lazy import engine_started, peer_key

log = logging.getLogger(__name__)
LOCAL_PATHS = {"ipc": "pdmesh.transfer.cuda_ipc", "shm": "pdmesh.transfer.shm"}
PATHS = ("auto", "mooncake", *LOCAL_PATHS)
PROBE_PAGES = 4  # destination pages each candidate reads at bind
PROBE_REPEATS = 3  # best of
LOCAL_MARGIN = 2.0  # a local path wins unless the transfer engine is this much faster


def host_id() -> str:
    """This machine's identity for same-host checks: the kernel's boot id and hostname
    (two containers of one host share the boot id but not /proc, so the local paths'
    own checks still decide). PDMESH_HOST_ID replaces it (tests play two hosts on one;
    or workers sharing a kernel that must not share memory)."""
    forced = os.environ.get("PDMESH_HOST_ID")
    if forced:
        return forced
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "no-boot-id"
    return f"{boot}/{socket.gethostname()}"


def _module(name: str) -> Any:
    return importlib.import_module(LOCAL_PATHS[name])


def local_endpoints(pool: Any) -> list[str]:
    """URIs through which a process on this host can write into `pool` (may be none)."""
    uris = []
    for name in LOCAL_PATHS:
        try:
            uri = _module(name).export_pool(pool)
        except Exception as e:  # a path that cannot export this pool is simply not offered
            log.debug("KV path %s cannot export the pool: %s", name, e)
            continue
        if uri:
            uris.append(uri)
    return uris


@dataclass(frozen=True)
class Destination:
    """A decode pool as the prefill sees it: transfer-engine session and base, host,
    local endpoints (from the decode's Transfer request)."""

    session_id: str
    kv_base: int
    host_id: str = ""
    local_endpoints: tuple[str, ...] = ()
    # a pool split over TP ranks: layout.KVRank of each (pdmesh.transfer.sharded); ()
    # = one pool at kv_base
    ranks: tuple = ()


class Route:
    """One path into one destination pool. `write_pages` blocks until the bytes are there."""

    name = "?"
    users = 0  # calls using this route now (Router._using)
    retired = False  # forgotten while in use: the last user closes it

    def write_pages(self, src_pages: Sequence[int], dst_pages: Sequence[int]) -> TransferStats:
        raise NotImplementedError

    def read_pages(self, dst_pages: Sequence[int]) -> Any:
        """The destination's pages as a uint8 tensor [n, bytes_per_page] (probe only)."""
        raise NotImplementedError

    def poke(self, dst_page: int, offset: int, value: int) -> None:
        """Set byte `offset` of the destination's page `dst_page` (the corrupt-KV chaos
        hook; blocks until it is there)."""
        raise NotImplementedError

    def checksum_pages(self, dst_pages: Sequence[int], algo: str) -> int:
        """pdmesh.transfer.checksum of the destination's pages as they are now."""
        from pdmesh.transfer.checksum import pages_checksum
        return pages_checksum(self.read_pages(dst_pages), range(len(dst_pages)), algo)

    def close(self) -> None:
        pass


class EngineRoute(Route):
    """Through the transfer engine (Mooncake)."""

    name = "mooncake"

    def __init__(self, transport: Any, src_base: int, dst: Destination, bytes_per_page: int):
        self.transport, self.src_base, self.dst, self.bpp = transport, src_base, dst, bytes_per_page

    def write_pages(self, src_pages: Sequence[int], dst_pages: Sequence[int]) -> TransferStats:
        return self.transport.write_pages(self.dst.session_id, self.src_base, self.dst.kv_base,
                                          self.bpp, src_pages, dst_pages)

    def read_pages(self, dst_pages: Sequence[int]) -> Any:
        read = getattr(self.transport, "read_pages", None)
        if read is None:  # e.g. a staged transport: cannot be probed, still usable
            raise NotImplementedError(f"{type(self.transport).__name__} cannot read pages")
        return read(self.dst.session_id, self.dst.kv_base, self.bpp, list(dst_pages))

    def poke(self, dst_page: int, offset: int, value: int) -> None:
        self.transport.write_bytes(self.dst.session_id,
                                   self.dst.kv_base + dst_page * self.bpp + offset, bytes([value]))


class LocalRoute(Route):
    """Through a peer pool opened on this host (shm or ipc)."""

    def __init__(self, peer: Any, bytes_per_page: int) -> None:
        self.peer, self.bpp, self.name = peer, bytes_per_page, peer.name

    def write_pages(self, src_pages: Sequence[int], dst_pages: Sequence[int]) -> TransferStats:
        return self.peer.write_pages(list(src_pages), list(dst_pages), self.bpp)

    def read_pages(self, dst_pages: Sequence[int]) -> Any:
        return self.peer.read_pages(list(dst_pages), self.bpp)

    def poke(self, dst_page: int, offset: int, value: int) -> None:
        self.peer.poke(dst_page * self.bpp + offset, value)

    def checksum_pages(self, dst_pages: Sequence[int], algo: str) -> int:
        """A peer that can digest its pages in place (shm) does; else read, then digest."""
        if hasattr(self.peer, "checksum_pages"):
            return self.peer.checksum_pages(list(dst_pages), self.bpp, algo)
        return super().checksum_pages(dst_pages, algo)

    def close(self) -> None:
        self.peer.close()


class Router:
    """Chooses and caches the route to every destination a prefill writes to.

    Thread-safe: writer threads call `write_pages()`; the first call for a destination
    binds (opens candidates, probes, picks) and the others for it wait for that answer.
    A route is closed (its peer pool unmapped) only once no write uses it."""

    def __init__(self, transport: Any, src_base: int, pool: Any, bytes_per_page: int,
                 path: str = "auto", my_host: str | None = None) -> None:
        if path not in PATHS:
            raise ValueError(f"kv path must be one of {', '.join(PATHS)}, got {path!r}")
        self.transport, self.src_base, self.pool = transport, src_base, pool
        self.bpp, self.path = bytes_per_page, path
        self.host = my_host if my_host is not None else host_id()
        self._routes: dict[tuple[str, int], Route] = {}
        self._lock = threading.Lock()

    def write_pages(self, dst: Destination, src_pages: Sequence[int],
                    dst_pages: Sequence[int]) -> TransferStats:
        """Write local src_pages[i] over dst's dst_pages[i] by the pair's route (bound on
        first use, probing with the first dst_pages, which the room holds); blocks."""
        with self._using(dst, dst_pages) as r:
            stats = r.write_pages(src_pages, dst_pages)
        return TransferStats(stats.bytes, stats.descriptors, stats.seconds, r.name)

    def read_pages(self, dst: Destination, dst_pages: Sequence[int]) -> Any:
        """dst's dst_pages as they are now, a uint8 tensor [n, bytes_per_page], read by
        the pair's route (a read never disturbs the peer); blocks. Raises
        NotImplementedError when that route cannot read (e.g. a staged transport)."""
        with self._using(dst, dst_pages) as r:
            return r.read_pages(list(dst_pages))

    def checksum_pages(self, dst: Destination, dst_pages: Sequence[int], algo: str) -> int:
        """pdmesh.transfer.checksum (by `algo`) of dst's dst_pages as they are now, read
        by the pair's route; blocks. NotImplementedError when that route cannot read."""
        with self._using(dst, dst_pages) as r:
            return r.checksum_pages(list(dst_pages), algo)

    def corrupt_page(self, dst: Destination, src_page: int, dst_page: int) -> None:
        """Chaos hook (tests only): change one byte of dst_page, just written from local
        src_page, through the pair's route. The source is only read: the engine and the
        source checksum may read it meanwhile (a prefix-cached page is shared)."""
        page = _bytes_of(self.pool, src_page)
        size = self.pool.element_size()
        # pdmesh's pool is [page, layer, offset, kv, head, dim]: the first V element of
        # layer 0, token 0 (every later token reads it), else the page's first element
        elem = self.pool.shape[-2] * self.pool.shape[-1] if self.pool.dim() == 6 else 0
        hi = elem * size + size - 1  # its high byte: the exponent, so the value becomes
        b = int(page[hi])  # absurd (about 1e38, inf or NaN), as a bad write would leave
        with self._using(dst, [dst_page]) as r:
            r.poke(dst_page, hi, (b | 0x7F) if b & 0x7F != 0x7F else b ^ 0x40)

    @property
    def algo(self) -> str:
        """The checksum algorithm of this pool (pdmesh.transfer.checksum.algo_for)."""
        from pdmesh.transfer.checksum import algo_for
        return algo_for(self.pool)

    def source_checksum(self, pages: Sequence[int], algo: str) -> int:
        """The checksum of this pool's own pages in order; blocks."""
        from pdmesh.transfer.checksum import pages_checksum
        return pages_checksum(self.pool, list(pages), algo)

    def route_name(self, dst: Destination) -> str | None:
        """The bound route's name, None before the pair binds."""
        r = self._routes.get(_key(dst))
        return r.name if r else None

    def forget(self, session_id: str) -> None:
        """The peer left: drop its routes (a restarted decode binds anew); `session_id`
        as the registry had it (its engine started since or not: same peer_key)."""
        key = peer_key(session_id)
        with self._lock:
            gone = [self._routes.pop(k) for k in list(self._routes) if k[0] == key]
        for r in gone:
            self._retire(r)

    def close(self) -> None:
        with self._lock:
            routes, self._routes = list(self._routes.values()), {}
        for r in routes:
            self._retire(r)

    @contextlib.contextmanager
    def _using(self, dst: Destination, dst_pages: Sequence[int]) -> Iterator[Route]:
        """The pair's route (bound now if new, probing with the first dst_pages), kept
        open until the block ends."""
        with self._lock:
            r = self._routes.get(_key(dst))
            if r is None:
                r = self._routes[_key(dst)] = \
                    self._bind(dst, list(dst_pages)[:PROBE_PAGES])
            r.users += 1
        try:
            yield r
        finally:
            with self._lock:
                r.users -= 1
                last = r.users == 0 and r.retired
            if last:
                r.close()

    def _retire(self, r: Route) -> None:
        with self._lock:
            r.retired = True
            idle = r.users == 0
        if idle:
            r.close()

    # -- binding -------------------------------------------------------------------------
    def _bind(self, dst: Destination, probe: list[int]) -> Route:
        candidates = self._open_local(dst)
        if self.transport is not None and (not candidates or self.path == "mooncake" or (
                self.path == "auto" and self._engines_run(dst))):
            candidates.append(EngineRoute(self.transport, self.src_base, dst, self.bpp))
        if not candidates:
            raise RuntimeError(f"no KV path to {dst.session_id}: no transport and no local "
                               f"endpoint opens")
        if self.path not in ("auto", "mooncake") and candidates[0].name != self.path:
            log.warning("KV path %s does not reach %s; using %s", self.path, dst.session_id,
                        candidates[0].name)
        chosen, timings = self._measure(candidates, probe) if len(candidates) > 1 \
            else (candidates[0], {})
        for r in candidates:
            if r is not chosen:
                r.close()
        log.info("KV path to %s: %s%s", dst.session_id, chosen.name,
                 "".join(f", {n} {t * 1e3:.3f} ms" for n, t in timings.items())
                 + (f" for {len(probe)} pages" if timings else ""))
        return chosen

    def _engines_run(self, dst: Destination) -> bool:
        """Both transfer engines already started: the engine may compete with a local
        path (a probe would otherwise start ours, and theirs is not listening)."""
        return getattr(self.transport, "started", True) and engine_started(dst.session_id)

    def _open_local(self, dst: Destination) -> list[Route]:
        if self.path == "mooncake" or not dst.host_id or dst.host_id != self.host:
            return []
        routes: list[Route] = []
        for uri in dst.local_endpoints:
            name = uri.partition(":")[0]
            if name not in LOCAL_PATHS or self.path not in ("auto", name):
                continue
            try:
                routes.append(LocalRoute(_module(name).open_peer(uri, self.pool), self.bpp))
            except Exception as e:  # another container, another GPU, no permission...
                log.info("KV path %s to %s does not open: %s", name, dst.session_id, e)
        return routes

    def _measure(self, candidates: list[Route], probe: list[int]) -> tuple[Route, dict]:
        """Time each candidate reading the probe pages; drop local ones that read other
        bytes than the transfer engine; the fastest wins, a local path unless the engine
        is more than LOCAL_MARGIN times faster (the first if none can read)."""
        times: dict[str, float] = {}
        seen: dict[str, bytes] = {}
        for r in candidates:
            try:
                best = float("inf")
                for _ in range(PROBE_REPEATS):
                    t0 = time.perf_counter()
                    data = r.read_pages(probe)
                    best = min(best, time.perf_counter() - t0)
                seen[r.name], times[r.name] = _bytes(data), best
            except Exception as e:
                log.info("KV path %s cannot be probed: %s", r.name, e)
        ref = seen.get("mooncake")
        ok = [r for r in candidates if r.name in times
              and (ref is None or r.name == "mooncake" or seen[r.name] == ref)]
        for r in candidates:
            if r.name in times and r not in ok:
                log.warning("KV path %s reads other bytes than the transfer engine: not used",
                            r.name)
        if not ok:
            return candidates[0], times  # none could be probed: local paths come first
        best = min(ok, key=lambda r: times[r.name])
        local = [r for r in ok if r.name != "mooncake"]
        if best.name == "mooncake" and local:
            # a same-host path spends no NIC or transfer-engine threads: it keeps the pair
            # unless the engine is clearly faster (a busy host's probe timings are noisy)
            fastest_local = min(local, key=lambda r: times[r.name])
            if times[fastest_local.name] <= LOCAL_MARGIN * times["mooncake"]:
                return fastest_local, times
        return best, times


def _key(dst: Destination) -> tuple[str, int]:
    """A route's key: the peer (for its whole life, pdmesh.transfer.lazy.peer_key) and
    pool. The pool base may change once, when a staged peer's engine starts."""
    return peer_key(dst.session_id), dst.kv_base


def _bytes_of(pool: Any, page: int) -> Any:
    """Page `page` of a contiguous page-major pool as a flat uint8 view (no copy)."""
    import torch
    return pool[page].reshape(-1).view(torch.uint8)


def _bytes(data: Any) -> bytes:
    if hasattr(data, "cpu"):  # a tensor, maybe on a GPU
        return data.cpu().contiguous().numpy().tobytes()
    return bytes(data)
