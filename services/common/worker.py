"""What every worker process has around its servicer: the engine on its EngineLoop, the
Mooncake transport with the KV pool registered, the registry registration + heartbeat,
and a Watch on the registry that reports peers that expire or leave.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from typing import Any, Callable

import grpc

from pdmesh.config import EngineConfig, WorkerConfig
from pdmesh.registry_client import RegistryClient
from pdmesh.telemetry.metrics import WorkerMetrics
from pdmesh.transfer import KVLayout, make_kv_transport
from pdmesh.v1 import registry_pb2 as rpb
from pdmesh.v1 import registry_pb2_grpc as rpb_grpc
from pdmesh.worker.engine_loop import EngineLoop

log = logging.getLogger(__name__)

ROLES = {"prefill": rpb.WORKER_ROLE_PREFILL, "decode": rpb.WORKER_ROLE_DECODE,
         "colocated": rpb.WORKER_ROLE_COLOCATED}
POOL_AXES = "page,layer,offset,kv,head,dim"  # pdmesh's page-major pool (model_runner)
# Called with (event type name, worker address) for EXPIRED and LEFT events.
OnPeerGone = Callable[[str, str], None]


class WorkerHost:
    """Engine + loop + transport of one worker. `start_registry` once the server is up."""

    def __init__(self, config: WorkerConfig, engine_config: EngineConfig,
                 use_transport: bool = True) -> None:
        from pdmesh.runtime.engine import Engine

        self.config = config
        self.engine = Engine(config=engine_config)
        self.loop = EngineLoop(self.engine).start()
        self.metrics = WorkerMetrics()  # the servicer observes events into it
        self.layout = KVLayout.from_engine(self.engine, config.model_id)
        self.transport = None
        self.kv_base = 0
        self.kv_transfer_mode = "none"  # direct | staged | host (pdmesh.transfer.staged)
        if use_transport:
            self.transport, self.kv_base, self.kv_transfer_mode = make_kv_transport(
                "mooncake", self.engine.runner.kv, config.kv_transfer_mode,
                hostname=config.advertise_host, protocol=config.transfer_protocol,
                device_name=config.transfer_device)
            print(f"KV transfer: {config.transfer_protocol}, mode {self.kv_transfer_mode} "
                  f"(pool on {self.engine.runner.kv.device})", flush=True)
        self.registry: RegistryClient | None = None
        self.watcher: RegistryWatcher | None = None
        self._reads: dict[str, Any] = {}  # read_engine: the last answer per key

    def read_engine(self, key: str, fn: Callable[[], Any], wait_s: float = 0.5) -> Any:
        """`fn()` run on the engine loop (between steps). While a long forward keeps the
        loop busy, the previous answer instead: heartbeats and /metrics must never wait
        on a step, or a healthy worker in a 10 s CPU prefill would miss its lease."""
        fut: Future = self.loop.call(fn)
        fut.add_done_callback(lambda f: f.exception() is None and
                              self._reads.__setitem__(key, f.result()))
        last = self._reads.get(key)
        try:
            return fut.result(timeout=wait_s if last is not None else 10.0)
        except FutureTimeout:
            if last is None:
                raise
            return last

    def registration(self, address: str, load: rpb.LoadReport) -> rpb.RegisterRequest:
        """What this worker publishes: role, address, model, KV layout, transfer endpoint."""
        lay = self.layout
        transfer = None
        if self.transport is not None:
            transfer = rpb.TransferEndpoint(session_id=self.transport.session_id,
                                            kv_base_address=self.kv_base,
                                            protocol=f"{self.config.transfer_protocol}/"
                                                     f"{self.kv_transfer_mode}")
        return rpb.RegisterRequest(
            role=ROLES[self.config.role], address=address, model_id=self.config.model_id,
            kv_layout=rpb.KvLayout(num_layers=lay.num_layers, page_size=lay.page_size,
                                   num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim,
                                   dtype=lay.dtype, bytes_per_page=lay.bytes_per_page,
                                   num_pages=lay.num_pages, layout=POOL_AXES),
            transfer=transfer,
            capacity=rpb.Capacity(max_running_requests=self.engine.config.max_running_requests,
                                  num_pages=lay.num_pages),
            load=load)

    def start_registry(self, address: str, load_fn: Callable[[], rpb.LoadReport],
                       on_peer_gone: OnPeerGone | None = None) -> str:
        """Register (raises grpc.RpcError when refused), heartbeat, and watch peers."""
        if on_peer_gone is not None:
            self.watcher = RegistryWatcher(self.config.registry, on_peer_gone).start()
        self.registry = RegistryClient(self.config.registry,
                                       self.registration(address, load_fn()), load_fn)
        return self.registry.start()

    def close(self, deregister: bool = True) -> None:
        """Deregister, stop watching, stop the loop and release the transfer engine."""
        if self.registry is not None:
            self.registry.close(deregister=deregister)
        if self.watcher is not None:
            self.watcher.stop()
        self.loop.stop()
        if self.transport is not None:
            self.transport.close()


class RegistryWatcher:
    """Follows the registry's Watch stream on a thread; tells `on_peer_gone` about
    EXPIRED/LEFT workers and remembers which addresses are gone (until they rejoin)."""

    def __init__(self, registry_addr: str, on_peer_gone: OnPeerGone) -> None:
        self._channel = grpc.insecure_channel(registry_addr)
        self._stub = rpb_grpc.RegistryStub(self._channel)
        self._on_gone = on_peer_gone
        self._gone: dict[str, float] = {}  # address -> when it expired or left
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._call = None
        self._thread = threading.Thread(target=self._run, name="registry-watch", daemon=True)

    def start(self) -> "RegistryWatcher":
        self._thread.start()
        return self

    def is_gone(self, address: str) -> bool:
        """True when `address` expired or left and has not registered again."""
        with self._lock:
            return address in self._gone

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._call = self._stub.Watch(rpb.WatchRequest())
                for ev in self._call:
                    self._handle(ev)
            except grpc.RpcError as e:
                if not self._stop.is_set():
                    log.warning("registry watch failed (%s); retrying", e.code())
            self._stop.wait(0.5)

    def _handle(self, ev: rpb.WorkerEvent) -> None:
        addr = ev.worker.address
        name = rpb.WorkerEvent.Type.Name(ev.type)
        if ev.type == rpb.WorkerEvent.JOINED:
            with self._lock:
                self._gone.pop(addr, None)
        elif ev.type in (rpb.WorkerEvent.EXPIRED, rpb.WorkerEvent.LEFT):
            with self._lock:
                self._gone[addr] = time.monotonic()
            try:
                self._on_gone(name, addr)
            except Exception:  # a bug in a handler must not stop the watch
                log.exception("peer-gone handler failed for %s", addr)

    def stop(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        self._channel.close()
        self._thread.join(timeout=2)
