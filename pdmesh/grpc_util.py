"""Shared gRPC server plumbing for every pdmesh service.

`create_aio_server` binds one port and serves the given servicers (grpc.aio, no thread
pool) plus grpc.health.v1.Health and server reflection, so `grpcurl list/describe`
works on any pdmesh port, and guards internal services with the cluster token
(pdmesh/auth.py), serves TLS or mTLS when the process has TLS material (pdmesh/tls.py),
and answers undecodable request bytes with INVALID_ARGUMENT
(pdmesh/grpc_decode.py). `stop_aio_gracefully` drains in-flight calls first.
Never imported by pdmesh.runtime (the runtime stays free of grpc).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdmesh import auth
from pdmesh import tls as tls_
from pdmesh.grpc_decode import DecodeGuard

# Trailing metadata of a failed Decode.Generate or Prefill.Prefill whose room failed
# because of the other worker: its value names that leg ("prefill" or "decode"), so the
# gateway retries away from it
BLAME_TRAILER = "pdmesh-blame"

@dataclass(frozen=True)
class Servicer:
    """One service to serve: the servicer object, its generated `add_*_to_server`
    function, and the full service name (e.g. "pdmesh.v1.Registry")."""

    impl: Any
    add_to_server: Callable[[Any, grpc.Server], None]
    full_name: str


def service_name(pb2_module: Any, service: str) -> str:
    """Full name of `service` from a generated *_pb2 module ("pdmesh.v1.Registry")."""
    return pb2_module.DESCRIPTOR.services_by_name[service].full_name


def add_services(server: Any, servicers: Iterable[Servicer], health_servicer: Any) -> list[str]:
    """Put `servicers`, grpc.health.v1.Health and server reflection on `server` (aio, or a
    sync one in test fakes); returns the names to mark SERVING once it runs."""
    servicers = list(servicers)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for s in servicers:
        s.add_to_server(s.impl, server)
    names = [s.full_name for s in servicers]
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    return ["", *names]


async def create_aio_server(addr: str, servicers: Iterable[Servicer], *,
                            options: list[tuple[str, Any]] | None = None,
                            interceptors: Iterable[Any] = (),
                            cluster_token: Any = auth.PROCESS,
                            tls: Any = tls_.PROCESS,
                            ) -> tuple[grpc.aio.Server, int, Any]:
    """Build and start a grpc.aio server on `addr` ("host:port"; port 0 picks a free one).
    No thread pool: nothing but the engine's own limits caps how many calls and streams
    are open at once. `interceptors` run first (e.g. metrics); tracing's are added when
    tracing is on. Every RPC but health and reflection needs `cluster_token` (default:
    the process's, pdmesh.auth.cluster_token(); None = open), unless every servicer is
    public (the gateway). With `tls` material (default: the process's, pdmesh.tls.current();
    None = plaintext) the port serves TLS; with a CA in it, internal servers require a
    client certificate signed by that CA (mTLS), which then stands for the cluster token;
    a public-only server never asks for one. Returns (server, bound port, health
    servicer); every service given, plus the overall server (""), is SERVING once started.
    """
    from pdmesh.telemetry import tracing

    servicers = list(servicers)
    names = [s.full_name for s in servicers]
    material = tls_.resolve(tls)
    public = all(name in auth.PUBLIC_SERVICES for name in names)
    mutual = material is not None and material.mutual and not public
    # after `interceptors` (metrics count refused calls), before tracing (no span for them)
    guard = auth.server_interceptors(names, cluster_token, mutual_tls=mutual)
    # DecodeGuard first: it wraps the handler the whole chain returns, so corrupt bytes
    # get INVALID_ARGUMENT (not UNKNOWN and a traceback) on every method
    server = grpc.aio.server(options=options or [], interceptors=[
        DecodeGuard(), *interceptors, *guard, *tracing.aio_server_interceptors()])
    health_servicer = health.aio.HealthServicer()
    names = add_services(server, servicers, health_servicer)
    if material is None:
        port = server.add_insecure_port(addr)
    else:
        port = server.add_secure_port(addr, tls_.server_credentials(material, public=public))
    if port == 0:
        raise RuntimeError(f"could not bind gRPC server to {addr}")
    await server.start()
    for name in names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


async def stop_aio_gracefully(server: grpc.aio.Server, health_servicer: Any = None,
                              grace_s: float = 5.0) -> None:
    """Report NOT_SERVING, refuse new calls, let in-flight ones finish for `grace_s`."""
    if health_servicer is not None:
        await health_servicer.enter_graceful_shutdown()
    await server.stop(grace_s)


def split_host_port(addr: str) -> tuple[str, int]:
    """("host", port) from "host:port" (IPv6 in brackets); ValueError when malformed."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address must be host:port, got {addr!r}")
    return host, int(port)
