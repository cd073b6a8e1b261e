"""Fault injection (`pdmesh.v1.Chaos`), served only by processes started with --chaos
(PDMESH_CHAOS=1): the worker's or the registry's faults, armed by RPC.

    chaos = Chaos("prefill", engine=host.engine)            # one per process
    server interceptors: [..., chaos.interceptor]            # RPC faults
    servicers: [..., chaos.servicer()]                       # the Chaos RPCs
    TransportWriter(..., faults=chaos)                       # KV write faults
    RegistryClient.chaos = chaos                             # heartbeat faults (worker)

Faults: delay/fail/corrupt the next N KV writes (prefill); stall/drop heartbeats for a
time (a worker's own, or on the registry every worker's); delay/fail the next N calls of
a named method served here; slow every engine step for a time. Corruption goes through
the same route hook as PDMESH_CHAOS_CORRUPT_KV (`Router.corrupt_page`). Everything runs
on the process's event loop except `heartbeat_hold` (the heartbeat thread reads two
floats). The Chaos service is guarded by the cluster token like every internal RPC.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from typing import Any

import grpc

from pdmesh.grpc_util import Servicer, service_name
from pdmesh.v1 import chaos_pb2 as pb
from pdmesh.v1 import chaos_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = service_name(pb, "Chaos")
MAX_COUNT, MAX_DELAY_S, MAX_DURATION_S, MAX_STEP_SLEEP_S = 10000, 60.0, 600.0, 10.0


class ChaosError(RuntimeError):
    """A KV write failed on purpose (KV_WRITE_ACTION_FAIL)."""


class Chaos:
    """The armed faults of one process. `role`: prefill | decode | colocated | registry;
    `engine`: the worker's AsyncEngine (None on the registry)."""

    def __init__(self, role: str, engine: Any = None, clock=time.monotonic) -> None:
        self.role, self.engine, self._clock = role, engine, clock
        self.kv_action, self.kv_left, self.kv_delay = 0, 0, 0.0
        self.hb_action, self.hb_until = 0, 0.0
        self.rpcs: dict[str, list] = {}  # method -> [action, left, delay_s, code]
        self.engine_until = 0.0
        self._engine_prev: float | None = None  # the step sleep before the fault
        self._engine_task: asyncio.Task | None = None
        self.fired = 0
        self.interceptor = ChaosInterceptor(self)
        self.methods: set[str] = set()  # short method names served here (for validation)

    # ---- arming ---------------------------------------------------------------------
    async def inject(self, f: pb.ChaosFault) -> None:
        """Arm `f`; ValueError (INVALID_ARGUMENT) or LookupError (FAILED_PRECONDITION)."""
        kind = f.WhichOneof("fault")
        if kind == "kv_write":
            k = f.kv_write
            if self.role != "prefill":
                raise LookupError(f"a {self.role} process writes no KV (only a prefill does)")
            _check_action(k.action, pb.KvWriteAction, "kv_write.action")
            _check_count(k.count)
            _check_range("kv_write.delay_s", k.delay_s, MAX_DELAY_S)
            self.kv_action, self.kv_left, self.kv_delay = k.action, k.count, k.delay_s
        elif kind == "heartbeat":
            h = f.heartbeat
            _check_action(h.action, pb.HeartbeatAction, "heartbeat.action")
            _check_range("heartbeat.duration_s", h.duration_s, MAX_DURATION_S)
            self.hb_action, self.hb_until = h.action, self._clock() + h.duration_s
        elif kind == "rpc":
            r = f.rpc
            if r.method not in self.methods:
                raise ValueError(f"rpc.method {r.method!r} is not served here (served: "
                                 f"{', '.join(sorted(self.methods))})")
            _check_action(r.action, pb.RpcAction, "rpc.action")
            _check_count(r.count)
            _check_range("rpc.delay_s", r.delay_s, MAX_DELAY_S)
            code = r.code or "UNAVAILABLE"
            if code not in grpc.StatusCode.__members__ or code == "OK":
                raise ValueError(f"rpc.code {r.code!r} is not a gRPC error code name")
            self.rpcs[r.method] = [r.action, r.count, r.delay_s, grpc.StatusCode[code]]
        elif kind == "engine":
            e = f.engine
            if self.engine is None:
                raise LookupError(f"a {self.role} process has no engine")
            if e.fail_step:  # the engine stops; the worker exits 1 to be replaced
                await self.engine.fail_next_step()
                log.warning("chaos: armed engine.fail_step: the next step raises")
                return
            _check_range("engine.step_sleep_s", e.step_sleep_s, MAX_STEP_SLEEP_S)
            _check_range("engine.duration_s", e.duration_s, MAX_DURATION_S)
            await self._slow_engine(e.step_sleep_s, e.duration_s)
        else:
            raise ValueError("set one fault: kv_write, heartbeat, rpc or engine")
        log.warning("chaos: armed %s", str(f).replace("\n", " ").strip())

    async def clear(self) -> None:
        self.kv_left, self.hb_until, self.rpcs = 0, 0.0, {}
        if self._engine_task is not None:
            self._engine_task.cancel()
            await self._restore_engine()

    async def _slow_engine(self, sleep_s: float, duration_s: float) -> None:
        if self._engine_task is not None:
            self._engine_task.cancel()
        if self._engine_prev is None:
            self._engine_prev = self.engine.stats.forward_sleep_time
        await self.engine.slow_down(sleep_s)
        self.engine_until = self._clock() + duration_s

        async def restore() -> None:
            await asyncio.sleep(duration_s)
            await self._restore_engine()
        self._engine_task = asyncio.ensure_future(restore())

    async def _restore_engine(self) -> None:
        prev, self._engine_prev, self._engine_task = self._engine_prev, None, None
        self.engine_until = 0.0
        if prev is not None:
            await self.engine.slow_down(prev)

    def state(self) -> pb.ChaosState:
        now = self._clock()
        return pb.ChaosState(
            role=self.role, kv_writes_armed=self.kv_left,
            kv_write_action=pb.KvWriteAction.Name(self.kv_action).removeprefix(
                "KV_WRITE_ACTION_") if self.kv_left else "",
            heartbeat_fault_left_s=max(0.0, self.hb_until - now),
            rpcs_armed={m: a[1] for m, a in self.rpcs.items() if a[1] > 0},
            engine_fault_left_s=max(0.0, self.engine_until - now) if self._engine_task else 0.0,
            fired=self.fired, pid=os.getpid())

    # ---- hooks ----------------------------------------------------------------------
    async def kv_write(self, room: int) -> bool:
        """Before a KV write of `room`: sleep (DELAY), raise ChaosError (FAIL), or True
        when the write is to be corrupted (CORRUPT)."""
        if self.kv_left <= 0:
            return False
        self.kv_left -= 1
        self.fired += 1
        if self.kv_action == pb.KV_WRITE_ACTION_DELAY:
            log.warning("chaos: delaying the KV write of room %d by %.3g s", room, self.kv_delay)
            await asyncio.sleep(self.kv_delay)
            return False
        if self.kv_action == pb.KV_WRITE_ACTION_FAIL:
            raise ChaosError(f"chaos: KV write of room {room} failed on purpose")
        return True

    def heartbeat_hold(self) -> tuple[str, float] | None:
        """On a worker's heartbeat thread: ("stall" | "drop", seconds left) while a
        heartbeat fault lasts, else None."""
        left = self.hb_until - self._clock()
        if left <= 0:
            return None
        return ("stall" if self.hb_action == pb.HEARTBEAT_ACTION_STALL else "drop"), left

    def rpc_fault(self, method: str) -> tuple[int, float, grpc.StatusCode] | None:
        """Consume one armed fault of `method`: (action, delay_s, code), or None."""
        armed = self.rpcs.get(method)
        if armed is None or armed[1] <= 0:
            return None
        armed[1] -= 1
        if armed[1] <= 0:
            del self.rpcs[method]
        self.fired += 1
        return armed[0], armed[2], armed[3]

    def servicer(self) -> Servicer:
        return Servicer(ChaosServicer(self), pb_grpc.add_ChaosServicer_to_server, SERVICE_NAME)


def _check_action(action: int, enum: Any, name: str) -> None:
    if action == 0 or action not in enum.values():
        raise ValueError(f"{name} is required: one of "
                         f"{', '.join(n for n in enum.keys() if not n.endswith('UNSPECIFIED'))}")


def _check_count(count: int) -> None:
    if not 1 <= count <= MAX_COUNT:
        raise ValueError(f"count must be in 1..{MAX_COUNT}, got {count}")


def _check_range(name: str, value: float, top: float) -> None:
    if not (math.isfinite(value) and 0 <= value <= top):
        raise ValueError(f"{name} must be in [0, {top:g}], got {value}")


class ChaosServicer(pb_grpc.ChaosServicer):
    def __init__(self, chaos: Chaos) -> None:
        self.chaos = chaos

    async def Inject(self, request: pb.ChaosFault, context) -> pb.ChaosState:
        """Arm one fault; INVALID_ARGUMENT / FAILED_PRECONDITION when it can't be."""
        try:
            await self.chaos.inject(request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except LookupError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return self.chaos.state()

    async def Clear(self, request: pb.ChaosClearRequest, context) -> pb.ChaosState:
        await self.chaos.clear()
        return self.chaos.state()

    async def State(self, request: pb.ChaosStateRequest, context) -> pb.ChaosState:
        return self.chaos.state()


class ChaosInterceptor(grpc.aio.ServerInterceptor):
    """Delays or fails the next calls of an armed method before its handler runs.
    On the registry, heartbeat faults apply to every Heartbeat call."""

    def __init__(self, chaos: Chaos) -> None:
        self.chaos = chaos

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return handler
        service, _, method = details.method.rpartition("/")
        if service.endswith(".Chaos"):
            return handler
        fault = self.chaos.rpc_fault(method)
        if self.chaos.role == "registry" and method == "Heartbeat":
            hold = self.chaos.heartbeat_hold()
            if hold is not None:
                return _registry_heartbeat(handler, *hold)
        if fault is None:
            return handler
        return _faulty(handler, details.method, *fault)


def _wrap(handler, behaviour_unary, behaviour_stream):
    kw = dict(request_deserializer=handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.request_streaming or handler.response_streaming:
        if handler.request_streaming:  # pdmesh serves no client-streaming RPC
            return handler
        return grpc.unary_stream_rpc_method_handler(behaviour_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(behaviour_unary, **kw)


def _faulty(handler, method: str, action: int, delay: float, code: grpc.StatusCode):
    async def before(context) -> None:
        if action == pb.RPC_ACTION_FAIL:
            await context.abort(code, f"chaos: {method} failed on purpose")
        await asyncio.sleep(delay)

    async def unary(request, context):
        await before(context)
        return await handler.unary_unary(request, context)

    async def stream(request, context):
        await before(context)
        async for item in handler.unary_stream(request, context):
            yield item
    return _wrap(handler, unary, stream)


def _registry_heartbeat(handler, what: str, left: float):
    """Registry: a stalled Heartbeat answers after `left` seconds; a dropped one answers
    at once without renewing the lease (0 interval: the worker keeps its own)."""
    from pdmesh.v1 import registry_pb2 as rpb

    async def unary(request, context):
        if what == "stall":
            await asyncio.sleep(left)
            return await handler.unary_unary(request, context)
        return rpb.HeartbeatResponse()
    return _wrap(handler, unary, None)


def served_methods(servicers) -> set[str]:
    """The short method names of `servicers` (grpc_util.Servicer), from their protos."""
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.Default()
    names: set[str] = set()
    for s in servicers:
        names.update(m.name for m in pool.FindServiceByName(s.full_name).methods)
    return names
