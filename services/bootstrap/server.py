"""`pdmesh.v1.Registry` over gRPC: a thin adapter between protos and the LeaseTable."""
from __future__ import annotations

import queue
import threading

import grpc

from pdmesh.config import RegistryConfig
from prometheus_client import CollectorRegistry

from pdmesh.telemetry.metrics import RpcMetricsInterceptor, SnapshotCollector
from pdmesh.grpc_util import Servicer, create_server as _create_grpc_server, service_name
from prometheus_client import CollectorRegistry

from pdmesh.telemetry.metrics import RpcMetricsInterceptor, SnapshotCollector
from pdmesh.grpc_util import stop_gracefully
from pdmesh.v1 import registry_pb2 as pb
from pdmesh.v1 import registry_pb2_grpc as pb_grpc
from pdmesh.services.bootstrap.registry import LeaseTable, Worker

SERVICE_NAME = service_name(pb, "Registry")
_EVENT_TYPES = {name: pb.WorkerEvent.Type.Value(name)
                for name in ("JOINED", "LEFT", "EXPIRED", "UPDATED")}
# How often an idle Watch stream checks whether its client is still there.
_WATCH_POLL_S = 0.5


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
        last_heartbeat_at=w.last_heartbeat_at)


class RegistryServicer(pb_grpc.RegistryServicer):
    """The Registry RPCs; all state lives in the LeaseTable."""

    def __init__(self, table: LeaseTable) -> None:
        self.table = table

    def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterResponse:
        """Add the worker; INVALID_ARGUMENT when role, address or model id is bad."""
        if request.role not in pb.WorkerRole.values():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"unknown role {request.role}")
        role = role_name(request.role)
        if role is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "role is required: PREFILL, DECODE or COLOCATED")
        spec = pb.RegisterRequest()
        spec.CopyFrom(request)
        try:
            w = self.table.register(role, request.address, request.model_id, spec=spec,
                                    load=request.load if request.HasField("load") else None)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        cfg = self.table.config
        return pb.RegisterResponse(worker_id=w.worker_id,
                                   heartbeat_interval_s=cfg.heartbeat_interval,
                                   heartbeat_max_failure=cfg.heartbeat_max_failure)

    def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        """Renew the lease; NOT_FOUND for an unknown worker (it must re-register)."""
        load = request.load if request.HasField("load") else None
        if self.table.heartbeat(request.worker_id, load) is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"worker {request.worker_id!r} is not registered; register again")
        return pb.HeartbeatResponse(heartbeat_interval_s=self.table.config.heartbeat_interval)

    def Deregister(self, request: pb.DeregisterRequest, context) -> pb.DeregisterResponse:
        """Remove the worker (watchers get LEFT); idempotent."""
        return pb.DeregisterResponse(removed=self.table.deregister(request.worker_id))

    def ListWorkers(self, request: pb.ListWorkersRequest, context) -> pb.ListWorkersResponse:
        """Current members, optionally of one role."""
        role = _role_filter(request, context)
        return pb.ListWorkersResponse(workers=[worker_info(w) for w in self.table.workers(role)])

    def Watch(self, request: pb.WatchRequest, context):
        """Stream the current members as JOINED, then every change until cancelled."""
        watcher = self.table.watch(_role_filter(request, context))
        # a client cancel (or deadline) wakes the blocked get() with None at once
        context.add_callback(watcher.close)
        try:
            for event in watcher.initial:
                yield _event(event)
            while context.is_active():
                try:
                    event = watcher.get(timeout=_WATCH_POLL_S)
                except queue.Empty:
                    continue
                if event is None:  # cancelled, or the registry is shutting down
                    return
                yield _event(event)
        finally:
            watcher.close()


def _role_filter(request, context) -> str | None:
    if not request.HasField("role") or request.role == pb.WORKER_ROLE_UNSPECIFIED:
        return None
    role = role_name(request.role)
    if role is None:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown role {request.role}")
    return role


def _event(event) -> pb.WorkerEvent:
    return pb.WorkerEvent(type=_EVENT_TYPES[event.type], worker=worker_info(event.worker))


class RegistryServer:
    """A running registry: gRPC server, lease table and the expiry timer thread."""

    def __init__(self, grpc_server: grpc.Server, port: int, table: LeaseTable, health) -> None:
        self.grpc_server, self.port, self.table, self.health = grpc_server, port, table, health
        self._stopped = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="registry-expiry", daemon=True)
        self._reaper.start()

    def _reap(self) -> None:
        # a quarter interval (at most 0.25 s) keeps expiry within that of the lease
        period = min(self.table.config.heartbeat_interval / 4, 0.25)
        while not self._stopped.wait(period):
            self.table.expire()

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop expiring, end Watch streams, drain unary calls for `grace_s`."""
        self._stopped.set()
        self.table.close_watchers()
        stop_gracefully(self.grpc_server, self.health, grace_s)
        self._reaper.join()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)


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


def create_server(addr: str, config: RegistryConfig | None = None,
                  table: LeaseTable | None = None, registry: CollectorRegistry | None = None,
                  ) -> tuple[RegistryServer, int]:
    """Start a registry on `addr` ("host:port", port 0 = free); return (server, port).
    Its metrics go to `registry` (a new CollectorRegistry when None: server.metrics)."""
    table = table or LeaseTable(config or RegistryConfig())
    metrics = registry or CollectorRegistry()
    metrics.register(SnapshotCollector(table.snapshot, REGISTRY_SPECS))
    servicer = Servicer(RegistryServicer(table), pb_grpc.add_RegistryServicer_to_server,
                        SERVICE_NAME)
    grpc_server, port, health = _create_grpc_server(
        addr, [servicer], interceptors=[RpcMetricsInterceptor(metrics, "pdmesh_registry")])
    server = RegistryServer(grpc_server, port, table, health)
    server.metrics = metrics
    return server, port
