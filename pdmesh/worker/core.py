"""A worker's engine core: the Engine, its KV pool's transport and the routes into peer
pools, built from the worker's configs. No grpc.

It lives either inside the RPC process (WorkerHost, the default) or alone in a process
of its own (`--engine-process`: pdmesh/worker/core_process.py), so what the layers
above need from it is a picklable `CoreInfo`, and its KV data-plane calls (`kv_op`) are
blocking functions of plain arguments that run wherever the pool is.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from pdmesh.config import EngineConfig, WorkerConfig


@dataclass(frozen=True)
class CoreInfo:
    """What the RPC side knows of a core: its model, pool and transfer endpoint."""

    engine_config: Any  # EngineConfig
    model_config: Any  # ModelConfig
    tokenizer: Any  # pdmesh.runtime.tokenizer.Tokenizer
    layout: Any  # pdmesh.transfer.KVLayout
    algo: str = ""  # the pool's checksum algorithm (pdmesh.transfer.checksum)
    session_id: str = ""  # "" when the core has no KV transport (colocated)
    kv_base: int = 0
    kv_transfer_mode: str = "none"  # direct | staged | host
    host_id: str = ""
    local_endpoints: tuple[str, ...] = ()
    phases: tuple[tuple[str, float], ...] = ()  # start-up phases and their seconds
    pid: int = 0


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _shared_kv_alloc() -> Any:
    """shm.alloc_pool where shared memory works (Linux memfd), else None (torch.zeros)."""
    try:
        from pdmesh.transfer import shm
        return shm.alloc_pool if hasattr(os, "memfd_create") else None
    except ImportError:
        return None


def _placeholder_pool(shape: tuple, dtype: Any) -> Any:
    """An untouched pool (a large torch.empty is a lazy mapping: no page resident), for an
    Engine whose runner a RankGroup replaces at once."""
    import torch

    return torch.empty(shape, dtype=dtype)


class EngineCore:
    """Engine + KV transport + router of one worker; `kv_op` runs one data-plane call."""

    def __init__(self, config: WorkerConfig, engine_config: EngineConfig,
                 use_transport: bool = True) -> None:
        self.config = config
        self.phases: list[tuple[str, float]] = []
        with self._phase("imports (torch, the runtime)"):  # 3.2 s on an H200 host
            from pdmesh.runtime.engine import Engine
            from pdmesh.runtime.loader import load_model
            from pdmesh.transfer import KVLayout
            from pdmesh.transfer.route import host_id
        with self._phase("model load"):
            loaded = load_model(engine_config.model)
        with self._phase("engine (weights to device, kernel tuning, CUDA graphs)"):
            # a host pool in shared memory, so a prefill on this host can write into it;
            # with TP the ranks' pools replace it: a placeholder never touched (no memory)
            alloc = _placeholder_pool if config.tp > 1 else \
                _shared_kv_alloc() if use_transport else None
            self.engine = Engine(config=engine_config, loaded=loaded, kv_alloc=alloc)
        self.ranks = None  # pdmesh.runtime.tp.ranks.RankGroup when config.tp > 1
        if config.tp > 1:
            from pdmesh.runtime.tp.ranks import RankGroup

            with self._phase(f"tensor-parallel ranks (tp {config.tp})"):
                self.ranks = RankGroup.attach(self.engine, config.tp)
        self.pool = self.engine.runner.kv
        self.layout = (self.ranks.layout(config.model_id) if self.ranks is not None
                       else KVLayout.from_engine(self.engine, config.model_id))
        self.transport, self.kv_base, self.mode = None, 0, "none"
        self.host_id, self.local_endpoints = host_id(), []
        self._router = None
        if use_transport:
            with self._phase("KV transport"):
                self._make_transport(config)
                if config.kv_checksum != "off" and self.ranks is None:
                    from pdmesh.transfer.checksum import warm_up

                    warm_up(self.pool)

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        t = time.monotonic()
        yield
        self.phases.append((name, time.monotonic() - t))

    def _make_transport(self, config: WorkerConfig) -> None:
        """The pool's transport, lazy (pdmesh.transfer.lazy: no transfer-engine port until
        a peer on another host needs one) unless every peer will write through it: the
        path is forced to the engine (no same-host path is then offered), the pool is
        split over TP ranks, or no same-host path exports it."""
        from pdmesh.transfer import make_kv_transport
        from pdmesh.transfer.route import local_endpoints

        tp = self.ranks is not None
        self.transport, self.kv_base, self.mode = make_kv_transport(
            "mooncake", self.pool, config.kv_transfer_mode, lazy=True,
            hostname=config.advertise_host, protocol=config.transfer_protocol,
            device_name=config.transfer_device)
        if not tp and config.kv_path != "mooncake":
            self.local_endpoints = local_endpoints(self.pool)
        if not self.local_endpoints:  # every peer writes through the engine: start it now
            self._kv_start_engine("TP ranks" if tp else "--kv-path mooncake"
                                  if config.kv_path == "mooncake" else "no same-host path")
        if tp:  # every rank's pool, each registered: peers write heads
            self._register_ranks()
        local = ", ".join(u.partition(":")[0] for u in self.local_endpoints) or "none"
        engine = ("started" if self.transport.started
                  else "starts when a peer on another host needs it")
        print(f"KV transfer: {config.transfer_protocol}, mode {self.mode} "
              f"(pool on {self.pool.device}); same-host paths: {local}; transfer engine "
              f"{engine}", flush=True)

    def _register_ranks(self) -> None:
        """Register ranks 1.. pools (mapped here) with the transport and publish each
        rank's pool base in the layout (no same-host paths: those copy whole logical
        pages)."""
        import dataclasses

        if self.mode not in ("host", "direct"):
            raise ValueError(f"kv transfer mode {self.mode!r} is not supported with --tp: "
                             "each rank's pool is registered as it is")
        ranks = []
        for r, pool in zip(self.layout.ranks, self.ranks.pools):
            if pool is None:
                raise RuntimeError("a TP worker's KV transfer needs every rank's pool in "
                                   "host memory (CPU ranks)")
            base = self.kv_base if pool is self.pool else self.transport.register(pool)
            ranks.append(dataclasses.replace(r, kv_base=base))
        self.layout = dataclasses.replace(self.layout, ranks=tuple(ranks))

    def info(self) -> CoreInfo:
        from pdmesh.transfer.checksum import algo_for

        eng = self.engine
        return CoreInfo(eng.config, eng.model_config, eng.tokenizer, self.layout,
                        algo_for(self.pool),
                        self.transport.session_id if self.transport is not None else "",
                        self.kv_base, self.mode, self.host_id, tuple(self.local_endpoints),
                        tuple(self.phases), os.getpid())

    def router(self) -> Any:
        """The prefill's choice of path into each decode pool (pdmesh.transfer.route)."""
        if self._router is None:
            from pdmesh.transfer.route import Router

            from pdmesh.transfer.sharded import ShardedRouter

            inner = Router(self.transport, self.kv_base, self.pool,
                           self.layout.bytes_per_page, self.config.kv_path, self.host_id)
            # writes from or to a pool split over TP ranks are staged per rank
            tp = self.ranks is not None
            self._router = ShardedRouter(inner, self.transport, self.sharded_pool(), tp,
                                         self.layout.bytes_per_page,
                                         self.ranks.check if tp else None,
                                         [r.kv_base for r in self.layout.ranks] if tp else None)
        return self._router

    def sharded_pool(self) -> Any:
        """Every rank's pool and KV heads (one pool holding all heads at TP 1)."""
        from pdmesh.transfer.sharded import ShardedPool

        if self.ranks is None:
            return ShardedPool([self.pool], [(0, self.layout.num_kv_heads)])
        return ShardedPool(self.ranks.pools, [p.kv_heads for p in self.ranks.plans])

    # -- the KV data plane, by name (blocking; run off any event loop) --------------------
    def kv_op(self, op: str, args: Sequence[Any]) -> Any:
        """Run data-plane call `op` (a name in KV_OPS) with `args`; blocks."""
        if op not in KV_OPS:
            raise ValueError(f"not a KV operation: {op!r}")
        return getattr(self, f"_kv_{op}")(*args)

    def _kv_write(self, dst: Any, src: list[int], dst_pages: list[int]) -> Any:
        return self.router().write_pages(dst, src, dst_pages)

    def _kv_corrupt(self, dst: Any, src_page: int, dst_page: int) -> None:
        self.router().corrupt_page(dst, src_page, dst_page)

    def _kv_read_checksum(self, dst: Any, pages: list[int], algo: str) -> int:
        return self.router().checksum_pages(dst, pages, algo)

    def _kv_checksum(self, pages: list[int], algo: str) -> int:
        from pdmesh.transfer.checksum import pages_checksum

        if self.ranks is not None:  # the logical pages, every head in order
            return self.sharded_pool().checksum(pages, algo)
        return pages_checksum(self.pool, pages, algo)

    def _kv_land(self, pages: list[int]) -> None:
        land = getattr(self.transport, "land", None)
        if land is not None:
            land(pages)

    def _kv_start_engine(self, reason: str = "a prefill on another host") -> tuple[str, int]:
        """Start the lazy transfer engine now (idempotent) -> (session id, pool base),
        what this worker's Transfer requests carry from then on."""
        start = getattr(self.transport, "start", None)
        if start is not None:
            self.kv_base = start(reason)[1]
        return self.transport.session_id, self.kv_base

    def _kv_forget(self, session_id: str) -> None:
        if self._router is not None:
            self._router.forget(session_id)

    def close(self) -> None:
        if self._router is not None:
            self._router.close()
        if self.transport is not None:
            self.transport.close()
        if self.ranks is not None:  # after the engine loop stopped: no step is running
            self.ranks.close()


KV_OPS = frozenset({"write", "corrupt", "read_checksum", "checksum", "land", "forget",
                    "start_engine"})
