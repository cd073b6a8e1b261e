"""`pdmesh.v1.Registry` on grpc.aio: a thin adapter between protos and the LeaseTable.

Every RPC and the expiry timer run on one event loop; a Watch stream is a suspended
coroutine reading an asyncio queue, so open watchers hold no thread.
"""
from __future__ import annotations

import asyncio
import logging
import threading

import grpc
from prometheus_client import CollectorRegistry

from pdmesh.config import RegistryConfig
from pdmesh.grpc_util import Servicer, create_aio_server, service_name, stop_aio_gracefully
from pdmesh.services.bootstrap.registry import LeaseTable, Worker
from pdmesh.telemetry.metrics import AioRpcMetricsInterceptor, SnapshotCollector
from pdmesh.v1 import registry_pb2 as pb
from pdmesh.v1 import registry_pb2_grpc as pb_grpc

SERVICE_NAME = service_name(pb, "Registry")
_EVENT_TYPES = {name: pb.WorkerEvent.Type.Value(name)
                for name in ("JOINED", "LEFT", "EXPIRED", "UPDATED")}


def role_name(role: int) -> str | None:
    """"PREFILL" for WORKER_ROLE_PREFILL; None for UNSPECIFIED or unknown numbers."""
    if role == pb.WORKER_ROLE_UNSPECIFIED or role not in pb.WorkerRole.values():
        return None
    return pb.WorkerRole.Name(role).removeprefix("WORKER_ROLE_")


def worker_info(w: Worker) -> pb.WorkerInfo:
    """The proto view of a table entry (its spec is the RegisterRequest)."""
    spec: pb.RegisterRequest = w.spec or pb.RegisterRequest()
    return pb.WorkerInfo(
        worker_id=w.worker_id, role=pb.WorkerRole.Value("WORKER_ROLE_" + w.role),
        address=w.address, model_id=w.model_id, kv_layout=spec.kv_layout,
        transfer=spec.transfer, capacity=spec.capacity,
        load=w.load or pb.LoadReport(), registered_at=w.registered_at,
        last_heartbeat_at=w.last_heartbeat_at,
        # unset stays unset: an older worker, whose defaults the gateway assumes
        kv_reuse=spec.kv_reuse if spec.HasField("kv_reuse") else None)


class RegistryServicer(pb_grpc.RegistryServicer):
    """The Registry RPCs; all state lives in the LeaseTable."""

    def __init__(self, table: LeaseTable) -> None:
        self.table = table

    async def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterResponse:
        """Add the worker; INVALID_ARGUMENT when role, address or model id is bad."""
        if request.role not in pb.WorkerRole.values():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"unknown role {request.role}")
        role = role_name(request.role)
        if role is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "role is required: PREFILL, DECODE or COLOCATED")
        spec = pb.RegisterRequest()
        spec.CopyFrom(request)
        try:
            w = self.table.register(role, request.address, request.model_id, spec=spec,
                                    load=request.load if request.HasField("load") else None)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        cfg = self.table.config
        return pb.RegisterResponse(worker_id=w.worker_id,
                                   heartbeat_interval_s=cfg.heartbeat_interval,
                                   heartbeat_max_failure=cfg.heartbeat_max_failure)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        """Renew the lease; NOT_FOUND for an unknown worker (it must re-register)."""
        load = request.load if request.HasField("load") else None
        if self.table.heartbeat(request.worker_id, load) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                          f"worker {request.worker_id!r} is not registered; register again")
        return pb.HeartbeatResponse(heartbeat_interval_s=self.table.config.heartbeat_interval)

    async def Deregister(self, request: pb.DeregisterRequest, context) -> pb.DeregisterResponse:
        """Remove the worker (watchers get LEFT); idempotent."""
        return pb.DeregisterResponse(removed=self.table.deregister(request.worker_id))

    async def ListWorkers(self, request: pb.ListWorkersRequest, context) -> pb.ListWorkersResponse:
        """Current members, optionally of one role."""
        role = await _role_filter(request, context)
        return pb.ListWorkersResponse(workers=[worker_info(w) for w in self.table.workers(role)])

    async def Watch(self, request: pb.WatchRequest, context):
        """Stream the current members as JOINED, then every change until cancelled."""
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        watcher = self.table.watch(await _role_filter(request, context),
                                   sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            for event in watcher.initial:
                yield _event(event)
            while (event := await events.get()) is not None:  # None: registry shutting down
                yield _event(event)
        finally:
            watcher.close()


async def _role_filter(request, context) -> str | None:
    if not request.HasField("role") or request.role == pb.WORKER_ROLE_UNSPECIFIED:
        return None
    role = role_name(request.role)
    if role is None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown role {request.role}")
    return role


def _event(event) -> pb.WorkerEvent:
    return pb.WorkerEvent(type=_EVENT_TYPES[event.type], worker=worker_info(event.worker))


class RegistryServer:
    """A running registry: gRPC server, lease table and the expiry task (one event loop)."""

    def __init__(self, grpc_server: grpc.aio.Server, port: int, table: LeaseTable, health,
                 metrics: CollectorRegistry) -> None:
        self.grpc_server, self.port, self.table, self.health = grpc_server, port, table, health
        self.metrics = metrics
        self._reaper = asyncio.ensure_future(self._reap())

    async def _reap(self) -> None:
        # wake when the first lease runs out (at least every quarter interval, at most
        # 0.25 s): a dead worker is expired on time, not up to a period after its lease
        period = min(self.table.config.heartbeat_interval / 4, 0.25)
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            nap = max(0.002, min(period, self.table.next_expiry_in() + 0.001))
            await asyncio.sleep(nap)
            now = loop.time()
            if now - last > nap + max(1.0, self.table.config.heartbeat_interval):
                # this process did not run (SIGSTOP, a paused VM): the missed beats are
                # ours, not the workers' -- expiring everyone now would be wrong
                logging.getLogger(__name__).warning(
                    "registry was not running for %.1f s; leases extended", now - last - nap)
                self.table.extend(now - last - nap)
            last = now
            self.table.expire()

    async def stop(self, grace_s: float = 2.0) -> None:
        """Stop expiring, end Watch streams, drain unary calls for `grace_s`."""
        self._reaper.cancel()
        self.table.close_watchers()
        await stop_aio_gracefully(self.grpc_server, self.health, grace_s)


# metric name -> (kind, help, LeaseTable.snapshot key)
REGISTRY_SPECS = {
    "pdmesh_registry_registrations": ("counter", "Register calls accepted", "registrations"),
    "pdmesh_registry_deregistrations": ("counter", "Workers that deregistered (LEFT)",
                                        "deregistrations"),
    "pdmesh_registry_heartbeats": ("counter", "Heartbeats of known workers", "heartbeats"),
    "pdmesh_registry_missed_heartbeats": ("counter", "Heartbeat intervals that passed "
                                          "without a beat (seen late, or at expiry)",
                                          "missed_heartbeats"),
    "pdmesh_registry_expiries": ("counter", "Workers expired for missing heartbeats",
                                 "expiries"),
    **{f"pdmesh_registry_workers_{r}": ("gauge", f"Registered {r} workers", f"workers_{r}")
       for r in ("prefill", "decode", "colocated")},
}


async def serve(addr: str, config: RegistryConfig | None = None,
                table: LeaseTable | None = None, registry: CollectorRegistry | None = None,
                ) -> RegistryServer:
    """Start a registry on `addr` ("host:port", port 0 = free) on the running event loop.
    Its metrics go to `registry` (a new CollectorRegistry when None: server.metrics)."""
    table = table or LeaseTable(config or RegistryConfig())
    metrics = registry or CollectorRegistry()
    metrics.register(SnapshotCollector(table.snapshot, REGISTRY_SPECS))
    servicer = Servicer(RegistryServicer(table), pb_grpc.add_RegistryServicer_to_server,
                        SERVICE_NAME)
    servicers, interceptors = [servicer], [AioRpcMetricsInterceptor(metrics, "pdmesh_registry")]
    if table.config.chaos:  # fault injection (services/common/chaos.py), armed by RPC
        from pdmesh.services.common.chaos import Chaos, served_methods

        chaos = Chaos("registry")
        chaos.methods = served_methods(servicers)
        servicers.append(chaos.servicer())
        interceptors.append(chaos.interceptor)
    grpc_server, port, health = await create_aio_server(addr, servicers,
                                                        interceptors=interceptors)
    return RegistryServer(grpc_server, port, table, health, metrics)


class BackgroundRegistry:
    """A registry on an event loop of its own thread, for in-process callers that are
    not async (tests, tools): `create_server` returns one."""

    def __init__(self, addr: str, config: RegistryConfig | None, table: LeaseTable | None,
                 registry: CollectorRegistry | None) -> None:
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="registry", daemon=True).start()
        self.server = asyncio.run_coroutine_threadsafe(
            serve(addr, config, table, registry), self._loop).result(30)
        self.port, self.table, self.metrics = self.server.port, self.server.table, self.server.metrics

    def stop(self, grace_s: float = 2.0) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace_s), self._loop).result(grace_s + 10)
        self._loop.call_soon_threadsafe(self._loop.stop)


def create_server(addr: str, config: RegistryConfig | None = None,
                  table: LeaseTable | None = None, registry: CollectorRegistry | None = None,
                  ) -> tuple[BackgroundRegistry, int]:
    """A registry serving on a background thread's event loop; returns (server, port)."""
    server = BackgroundRegistry(addr, config, table, registry)
    return server, server.port
