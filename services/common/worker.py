"""What every worker process has around its servicer: the engine behind its AsyncEngine,
the Mooncake transport with the KV pool registered, the registry registration +
heartbeat, and a Watch on the registry that reports peers that expire or leave.

Built in two steps: `WorkerHost(...)` loads the model and the transport (blocking,
before the event loop matters; in a child process with `--engine-process`),
`await host.start()` starts the engine loop and binds it to the running event loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Callable, Iterator

from pdmesh.config import EngineConfig, WorkerConfig
from pdmesh.registry_client import RegistryClient
from pdmesh.registry_watch import GONE, RegistryWatch
from pdmesh.telemetry.metrics import WorkerMetrics
from pdmesh.transfer.sharded import kv_rank_proto
from pdmesh.services.common.kv import TransportReceiver
from pdmesh.services.common.kv_engine import EngineGate
from pdmesh.v1 import registry_pb2 as rpb
from pdmesh.worker.aio_engine import AsyncEngine
from pdmesh.worker.core import process_age_s

log = logging.getLogger(__name__)

ROLES = {"prefill": rpb.WORKER_ROLE_PREFILL, "decode": rpb.WORKER_ROLE_DECODE,
         "colocated": rpb.WORKER_ROLE_COLOCATED}
POOL_AXES = "page,layer,offset,kv,head,dim"  # pdmesh's page-major pool (model_runner)
# Called with (event type name, worker address) for EXPIRED and LEFT events.
OnPeerGone = Callable[[str, str], None]


def kv_reuse(engine: EngineConfig, role: str) -> rpb.KvReuse:
    """What a worker of `role` whose engine runs with `engine` reuses of earlier requests'
    KV: its prefix cache (EngineConfig.uses_prefix_cache, the engine's own rule); adopted
    KV kept in it with decode_prefix_cache, which only a decode worker adopts. The
    gateway's pd-mode cost model reads it from the registry."""
    cache = engine.uses_prefix_cache()
    return rpb.KvReuse(prefix_cache=cache,
                       adopted_kv=cache and engine.decode_prefix_cache and role == "decode")


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
        age = process_age_s()
        since = "" if age is None else f"{age:.1f} s after the process started, "
        return f"{since}{time.monotonic() - self.t0:.1f} s after imports ({parts})"


class WorkerHost:
    """Engine + transport + registry membership of one worker process. The engine core
    (pdmesh.worker.core) runs in this process, or in a child process of its own
    (`--engine-process`, the default on a GPU; pdmesh.worker.engine_proxy): the layers above see the same
    AsyncEngine, KV writer/receiver and fields either way."""

    def __init__(self, config: WorkerConfig, engine_config: EngineConfig,
                 use_transport: bool = True) -> None:
        self.config = config
        self.startup = Startup()
        self._core = self._process = None
        if config.uses_engine_process(engine_config):
            from pdmesh.worker.engine_proxy import EngineProcess

            with self.startup.phase("engine process"):
                self._process = EngineProcess(config, engine_config, use_transport)
            info = self._process.info
            self.startup.phases[-1:-1] = list(info.phases)  # its parts, then the whole
        else:
            from pdmesh.worker.core import EngineCore

            self._core = EngineCore(config, engine_config, use_transport)
            info = self._core.info()
            self.startup.phases.extend(info.phases)
        self.info = info
        self.model_config, self.tokenizer, self.layout = (info.model_config, info.tokenizer,
                                                          info.layout)
        self.has_kv = bool(info.session_id)  # a KV transport: prefill and decode roles
        self.session_id, self.kv_base = info.session_id, info.kv_base
        self.kv_transfer_mode = info.kv_transfer_mode  # direct | staged | host | none
        self.host_id, self.local_endpoints = info.host_id, list(info.local_endpoints)
        core = self._process if self._process is not None else self._core
        # the decode's transfer engine, started before a Transfer to a prefill needing it
        self.kv_engine = EngineGate(core.kv_op, self.session_id, self.kv_base, self.host_id,
                                    self.local_endpoints, config.registry)
        self.metrics = WorkerMetrics()  # the servicer observes events into it
        self._router: Any = None
        self.engine: AsyncEngine | None = None
        self.registry: RegistryClient | None = None
        self.watch: RegistryWatch | None = None
        self.chaos = None  # services/common/chaos.Chaos when started with --chaos

    def router(self) -> Any:
        """The prefill's choice of path into each decode pool (pdmesh.transfer.route);
        routes to a peer that leaves the registry are closed (its pool unmapped)."""
        if self._router is None:
            if self._process is not None:
                from pdmesh.worker.engine_proxy import RemoteRouter

                self._router = RemoteRouter(self._process)
            else:
                self._router = self._core.router()
        return self._router

    def kv_receiver(self, checksum: bool) -> TransportReceiver:
        """The decode's side of the data plane over this worker's pool."""
        core = self._process if self._process is not None else self._core
        return TransportReceiver(core.kv_op, checksum, staged=self.kv_transfer_mode == "staged")

    async def start(self) -> "WorkerHost":
        """Start the engine loop (thread or process), bound to the running event loop."""
        if self._process is not None:
            self.engine = AsyncEngine(process=self._process)
        else:
            self.engine = AsyncEngine(self._core.engine)
        return self

    def registration(self, address: str, load: rpb.LoadReport) -> rpb.RegisterRequest:
        """What this worker publishes: role, address, model, KV layout, transfer endpoint,
        capacity, load and what it reuses of earlier requests' KV."""
        lay = self.layout
        transfer = None
        if self.has_kv:
            transfer = rpb.TransferEndpoint(session_id=self.session_id,
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
                                   num_pages=lay.num_pages, layout=POOL_AXES,
                                   tp_size=self.config.tp,
                                   ranks=[kv_rank_proto(r) for r in lay.ranks]),
            transfer=transfer,
            capacity=rpb.Capacity(max_running_requests=self.info.engine_config.max_running_requests,
                                  num_pages=lay.num_pages),
            load=load, kv_reuse=kv_reuse(self.info.engine_config, self.config.role))

    async def start_registry(self, address: str, load_fn: Callable[[], rpb.LoadReport],
                             on_peer_gone: OnPeerGone | None = None) -> str:
        """Watch peers, register (raises grpc.RpcError when refused) and heartbeat."""
        def on_event(name: str, info: Any) -> None:
            self.kv_engine.observe(name, info)
            if name in GONE and self._router is not None and info.transfer.session_id:
                self._router.forget(info.transfer.session_id)
            if name in GONE and on_peer_gone is not None:
                on_peer_gone(name, info.address)
        self.watch = RegistryWatch(self.config.registry, on_event).start()
        self.registry = RegistryClient(self.config.registry,
                                       self.registration(address, load_fn()), load_fn)
        self.registry.chaos = self.chaos  # heartbeat faults
        return await asyncio.to_thread(self.registry.start, self.config.registry_wait_s)

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
        elif self._process is not None:  # never started
            await asyncio.to_thread(self._process.stop)
        if self._core is not None:
            self._core.close()
