"""What every worker process has around its servicer: the engine behind its AsyncEngine,
the Mooncake transport with the KV pool registered, the registry registration +
heartbeat, and a Watch on the registry that reports peers that expire or leave.

Built in two steps: `WorkerHost(...)` loads the model and the transport (blocking,
before the event loop matters), `await host.start()` starts the engine loop thread
and binds it to the running event loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, Callable, Iterator

from pdmesh.config import EngineConfig, WorkerConfig
from pdmesh.registry_client import RegistryClient
from pdmesh.registry_watch import GONE, RegistryWatch
from pdmesh.telemetry.metrics import WorkerMetrics
from pdmesh.transfer import KVLayout, make_kv_transport
from pdmesh.transfer.route import Router, host_id, local_endpoints
from pdmesh.v1 import registry_pb2 as rpb
from pdmesh.worker.aio_engine import AsyncEngine

log = logging.getLogger(__name__)

ROLES = {"prefill": rpb.WORKER_ROLE_PREFILL, "decode": rpb.WORKER_ROLE_DECODE,
         "colocated": rpb.WORKER_ROLE_COLOCATED}
POOL_AXES = "page,layer,offset,kv,head,dim"  # pdmesh's page-major pool (model_runner)
# Called with (event type name, worker address) for EXPIRED and LEFT events.
OnPeerGone = Callable[[str, str], None]


class Startup:
    """How long each start-up phase took, for the worker's `ready` line."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.phases: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.monotonic()
        yield
        self.phases.append((name, time.monotonic() - t))

    def line(self) -> str:
        parts = ", ".join(f"{name} {s:.1f} s" for name, s in self.phases)
        age = _process_age_s()
        since = "" if age is None else f"{age:.1f} s after the process started, "
        return f"{since}{time.monotonic() - self.t0:.1f} s after imports ({parts})"


def _process_age_s() -> float | None:
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


class WorkerHost:
    """Engine + transport + registry membership of one worker process."""

    def __init__(self, config: WorkerConfig, engine_config: EngineConfig,
                 use_transport: bool = True) -> None:
        from pdmesh.runtime.engine import Engine
        from pdmesh.runtime.loader import load_model

        self.config = config
        self.startup = Startup()
        with self.startup.phase("model load"):
            loaded = load_model(engine_config.model)
        with self.startup.phase("engine (weights to device, kernel tuning, CUDA graphs)"):
            # a host pool in shared memory, so a prefill on this host can write into it
            self._engine = Engine(config=engine_config, loaded=loaded,
                                  kv_alloc=_shared_kv_alloc() if use_transport else None)
        self.model_config = self._engine.model_config
        self.tokenizer = self._engine.tokenizer
        self.metrics = WorkerMetrics()  # the servicer observes events into it
        self.layout = KVLayout.from_engine(self._engine, config.model_id)
        self.transport = None
        self.kv_base = 0
        self.kv_transfer_mode = "none"  # direct | staged | host (pdmesh.transfer.staged)
        self.host_id, self.local_endpoints = host_id(), []  # same-host paths (transfer.route)
        self._router: Router | None = None
        if use_transport:
            with self.startup.phase("KV transport"):
                self._make_transport(config)
        self.engine: AsyncEngine | None = None
        self.registry: RegistryClient | None = None
        self.watch: RegistryWatch | None = None
        self.chaos = None  # services/common/chaos.Chaos when started with --chaos

    def _make_transport(self, config: WorkerConfig) -> None:
        self.transport, self.kv_base, self.kv_transfer_mode = make_kv_transport(
            "mooncake", self._engine.runner.kv, config.kv_transfer_mode,
            hostname=config.advertise_host, protocol=config.transfer_protocol,
            device_name=config.transfer_device)
        self.local_endpoints = local_endpoints(self._engine.runner.kv)
        local = ", ".join(u.partition(":")[0] for u in self.local_endpoints) or "none"
        print(f"KV transfer: {config.transfer_protocol}, mode {self.kv_transfer_mode} "
              f"(pool on {self._engine.runner.kv.device}); same-host paths: {local}", flush=True)

    def router(self) -> Router:
        """The prefill's choice of path into each decode pool (pdmesh.transfer.route);
        routes to a peer that leaves the registry are closed (its pool unmapped)."""
        if self._router is None:
            self._router = Router(self.transport, self.kv_base, self._engine.runner.kv,
                                  self.layout.bytes_per_page, self.config.kv_path, self.host_id)
        return self._router

    async def start(self) -> "WorkerHost":
        """Start the engine loop on its thread, bound to the running event loop."""
        self.engine = AsyncEngine(self._engine)
        return self

    def registration(self, address: str, load: rpb.LoadReport) -> rpb.RegisterRequest:
        """What this worker publishes: role, address, model, KV layout, transfer endpoint."""
        lay = self.layout
        transfer = None
        if self.transport is not None:
            transfer = rpb.TransferEndpoint(session_id=self.transport.session_id,
                                            kv_base_address=self.kv_base,
                                            protocol=f"{self.config.transfer_protocol}/"
                                                     f"{self.kv_transfer_mode}",
                                            host_id=self.host_id,
                                            local_endpoints=self.local_endpoints)
        return rpb.RegisterRequest(
            role=ROLES[self.config.role], address=address, model_id=self.config.model_id,
            kv_layout=rpb.KvLayout(num_layers=lay.num_layers, page_size=lay.page_size,
                                   num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim,
                                   dtype=lay.dtype, bytes_per_page=lay.bytes_per_page,
                                   num_pages=lay.num_pages, layout=POOL_AXES),
            transfer=transfer,
            capacity=rpb.Capacity(max_running_requests=self._engine.config.max_running_requests,
                                  num_pages=lay.num_pages),
            load=load)

    async def start_registry(self, address: str, load_fn: Callable[[], rpb.LoadReport],
                             on_peer_gone: OnPeerGone | None = None) -> str:
        """Watch peers, register (raises grpc.RpcError when refused) and heartbeat."""
        def on_event(name: str, info: Any) -> None:
            if name in GONE and self._router is not None and info.transfer.session_id:
                self._router.forget(info.transfer.session_id)
            if name in GONE and on_peer_gone is not None:
                on_peer_gone(name, info.address)
        self.watch = RegistryWatch(self.config.registry, on_event).start()
        self.registry = RegistryClient(self.config.registry,
                                       self.registration(address, load_fn()), load_fn)
        self.registry.chaos = self.chaos  # heartbeat faults
        return await asyncio.to_thread(self.registry.start)

    def is_gone(self, address: str) -> bool:
        """Liveness (pdmesh.disagg.ports): `address` expired or left the registry."""
        return self.watch is not None and self.watch.is_gone(address)

    async def close(self, deregister: bool = True) -> None:
        """Deregister, stop watching, stop the loop and release the transfer engine."""
        if self.registry is not None:
            await asyncio.to_thread(self.registry.close, deregister)
        if self.watch is not None:
            await self.watch.close()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)
        if self.transport is not None:
            self.transport.close()
