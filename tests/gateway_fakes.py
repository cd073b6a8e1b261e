"""In-test fake Decode/Prefill workers for gateway tests: real gRPC servers (port 0)
with canned token streams, registered in a real registry. They test the gateway
layer alone; the real workers are tested in tests/test_workers.py.

Magic seeds steer them: PREFILL_FAILS makes Prefill fail (the decode then waits for
KV that never comes, as a real one would), SLOW streams one token per 0.1 s, ECHO
streams the prompt's own token ids back (one per 20 ms: streams overlap), so a client
can tell its tokens from another request's, FAILS_AFTER_FIRST makes the decode fail
(UNAVAILABLE) right after its first token. A worker started with `broken=True` answers
every call UNAVAILABLE (a worker that is gone, as the gateway sees it).
"""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2

from pdmesh.grpc_util import Servicer, add_services, service_name
from pdmesh.registry_client import RegistryClient
from pdmesh.v1 import common_pb2 as cpb
from pdmesh.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from pdmesh.v1 import registry_pb2 as rpb

PREFILL_FAILS, SLOW, ECHO, FAILS_AFTER_FIRST, ENDS_EARLY = 666, 777, 888, 999, 555


class FakeMesh:
    """Shared state of the fakes: which rooms were prefilled, cancelled, seen."""

    def __init__(self, reply_ids: list[int]) -> None:
        self.reply_ids = reply_ids
        self.prefilled: dict[int, threading.Event] = {}
        self.cancelled: set[int] = set()
        self.requests: list[decode_pb2.DecodeRequest] = []
        self.lock = threading.Lock()
        self.active = self.peak = 0  # decode streams running now / at most

    def room_event(self, room: int) -> threading.Event:
        with self.lock:
            return self.prefilled.setdefault(room, threading.Event())


class FakeDecode(decode_pb2_grpc.DecodeServicer):
    def __init__(self, mesh: FakeMesh, broken: bool = False) -> None:
        self.mesh, self.broken, self.calls = mesh, broken, 0

    def Generate(self, request, context):
        """Wait for the room's prefill (unless colocated), then stream reply_ids."""
        mesh, sp = self.mesh, request.sampling_params
        self.calls += 1
        if self.broken:
            context.abort(grpc.StatusCode.UNAVAILABLE, "fake decode is broken")
        mesh.requests.append(request)
        context.add_callback(lambda: mesh.cancelled.add(request.room)
                             if not context.is_active() else None)
        if request.prefill_address and not mesh.room_event(request.room).wait(30):
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no KV")
        reply = list(request.token_ids) if sp.seed == ECHO else mesh.reply_ids
        n = min(sp.max_tokens if sp.HasField("max_tokens") else 16, len(reply))
        with mesh.lock:
            mesh.active += 1
            mesh.peak = max(mesh.peak, mesh.active)
        try:
            yield from self._stream(request, context, reply, n)
        finally:
            with mesh.lock:
                mesh.active -= 1

    def _stream(self, request, context, reply, n):
        sp = request.sampling_params
        for i in range(n):
            if not context.is_active():
                return
            if sp.seed in (SLOW, ECHO):
                time.sleep(0.1 if sp.seed == SLOW else 0.02)
            last = i == n - 1
            chunk = decode_pb2.DecodeChunk(token_ids=[reply[i]])
            if sp.HasField("logprobs"):
                chunk.logprobs.add(token_id=reply[i], logprob=-0.5,
                                   top_logprobs=[cpb.TopLogprob(token_id=reply[i],
                                                                logprob=-0.5)] * sp.logprobs)
            if last:
                chunk.finish_reason = cpb.FINISH_REASON_LENGTH
                chunk.usage.CopyFrom(cpb.Usage(prompt_tokens=len(request.token_ids),
                                               completion_tokens=n,
                                               total_tokens=len(request.token_ids) + n))
            yield chunk
            if sp.seed == ENDS_EARLY:
                return  # status OK, no finish_reason: a broken worker
            if sp.seed == FAILS_AFTER_FIRST:
                context.abort(grpc.StatusCode.UNAVAILABLE, "fake decode died mid-stream")

    def Abort(self, request, context):
        return decode_pb2.DecodeAbortResponse()


class FakePrefill(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, mesh: FakeMesh, broken: bool = False) -> None:
        self.mesh, self.broken, self.calls = mesh, broken, 0

    def Prefill(self, request, context):
        """Succeed at once (releasing the decode), or fail for the magic seed."""
        self.calls += 1
        if self.broken:
            context.abort(grpc.StatusCode.UNAVAILABLE, "fake prefill is broken")
        if request.sampling_params.seed == PREFILL_FAILS:
            time.sleep(0.2)
            context.abort(grpc.StatusCode.INTERNAL, "fake prefill exploded")
        self.mesh.room_event(request.room).set()
        return prefill_pb2.PrefillResponse(room=request.room)


def create_server(addr: str, servicers, max_workers: int):
    """A sync server for these fakes (a thread per open stream, like the fakes' code)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    health_servicer = health.HealthServicer()
    names = add_services(server, servicers, health_servicer)
    port = server.add_insecure_port(addr)
    server.start()
    for name in names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


def start_worker(mesh: FakeMesh, role: int, registry: str, max_workers: int = 32,
                 broken: bool = False):
    """A fake worker of `role` on a free port, registered; returns (server, client).
    Each open stream (and each Prefill) holds one of its `max_workers` threads.
    `broken`: every call fails UNAVAILABLE (server.fake counts the calls)."""
    if role == rpb.WORKER_ROLE_PREFILL:
        fake = FakePrefill(mesh, broken)
        svc = Servicer(fake, prefill_pb2_grpc.add_PrefillServicer_to_server,
                       service_name(prefill_pb2, "Prefill"))
    else:
        fake = FakeDecode(mesh, broken)
        svc = Servicer(fake, decode_pb2_grpc.add_DecodeServicer_to_server,
                       service_name(decode_pb2, "Decode"))
    server, port, _ = create_server("127.0.0.1:0", [svc], max_workers=max_workers)
    client = RegistryClient(registry, rpb.RegisterRequest(
        role=role, address=f"127.0.0.1:{port}", model_id="default"))
    client.start()
    server.fake = fake
    return server, client


def stop_workers(mesh: FakeMesh) -> None:
    """Teardown: let fake decodes still waiting for a failed prefill's KV go (else the
    interpreter waits for their threads at exit), then stop every fake worker."""
    with mesh.lock:
        for event in mesh.prefilled.values():
            event.set()
    for server, client in mesh.workers:
        client.close()
        server.stop(0)
