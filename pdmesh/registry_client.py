"""Worker side of the registry: register, heartbeat in a thread, deregister on close.

    client = RegistryClient("registry:50050", registration, load_fn=engine_load)
    client.start(wait_s=30) # registers (raises grpc.RpcError if the registry refuses,
                            # or has not answered within wait_s)
    ...
    client.close()          # stops heartbeating and deregisters

The heartbeat interval comes from the registry's RegisterResponse. On NOT_FOUND
(expired, or the registry restarted) the client registers again and gets a new
worker id; on other errors it keeps trying every interval, so a registry outage
shorter than a lease costs nothing.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import grpc

from pdmesh import auth
from pdmesh.v1 import registry_pb2 as pb
from pdmesh.v1 import registry_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
# a registry that does not answer yet (starting, or a loaded host: a connection attempt
# timed out before its HTTP/2 SETTINGS frame) is asked again; any other answer is final
NOT_ANSWERING = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
RETRY_S = 0.25
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100),
                     ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 250)]


class RegistryClient:
    """Keeps one worker registered while it runs. Thread-safe `worker_id`."""

    def __init__(self, registry_addr: str, registration: pb.RegisterRequest,
                 load_fn: Callable[[], pb.LoadReport] | None = None,
                 rpc_timeout_s: float = 5.0) -> None:
        self.registration = registration
        self._load_fn = load_fn
        self._timeout = rpc_timeout_s
        # carries the cluster token; reconnects within 250 ms of a registry's return
        # (gRPC's default backoff grows to 120 s: a restarted registry would wait that long
        # for its workers)
        self._channel = auth.insecure_channel(registry_addr, options=RECONNECT_OPTIONS)
        self._stub = pb_grpc.RegistryStub(self._channel)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.worker_id: str | None = None
        self.interval_s = 5.0
        self.registrations = 0  # how many times Register succeeded (re-registers count)
        self.chaos = None  # services/common/chaos.Chaos (--chaos): stalls or drops beats

    def start(self, wait_s: float = 0.0) -> str:
        """Register and start heartbeating. While the registry does not answer
        (UNAVAILABLE, DEADLINE_EXCEEDED) it is asked again every 0.25 s for up to `wait_s`
        seconds; then, or on a refusal, raises the grpc.RpcError."""
        deadline, tries = time.monotonic() + wait_s, 0
        while True:
            try:
                self._register()
                break
            except grpc.RpcError as e:
                if e.code() not in NOT_ANSWERING or time.monotonic() + RETRY_S > deadline:
                    raise
                if tries == 0:  # one line, not one per try
                    log.warning("the registry is not answering (%s: %s); asking again for "
                                "up to %.0f s", e.code().name, e.details(), wait_s)
                tries += 1
                time.sleep(RETRY_S)
        self._thread = threading.Thread(target=self._loop, name="registry-heartbeat",
                                        daemon=True)
        self._thread.start()
        return self.worker_id

    def _register(self) -> None:
        req = pb.RegisterRequest()
        req.CopyFrom(self.registration)
        if self._load_fn is not None:
            req.load.CopyFrom(self._load_fn())
        resp = self._stub.Register(req, timeout=self._timeout)
        self.worker_id, self.interval_s = resp.worker_id, resp.heartbeat_interval_s
        self.registrations += 1
        log.info("registered as %s (heartbeat every %.3gs)", self.worker_id, self.interval_s)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            hold = self.chaos.heartbeat_hold() if self.chaos is not None else None
            if hold is not None:
                if hold[0] == "drop":
                    continue
                if self._stop.wait(hold[1]):  # stall: the thread blocks, then beats
                    return
            try:
                self.heartbeat_once()
            except grpc.RpcError as e:  # registry down: keep trying each interval
                log.warning("heartbeat failed: %s", e.code())

    def heartbeat_once(self) -> None:
        """One heartbeat; re-register when the registry no longer knows us."""
        load = self._load_fn() if self._load_fn is not None else None
        try:
            # wait_for_ready: while the registry is down the beat waits for it (up to the
            # timeout) instead of failing at once, so a registry that comes back is
            # reached as soon as the channel reconnects, not a whole interval later
            resp = self._stub.Heartbeat(pb.HeartbeatRequest(worker_id=self.worker_id, load=load),
                                        timeout=self._timeout, wait_for_ready=True)
            self.interval_s = resp.heartbeat_interval_s or self.interval_s
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            log.warning("registry forgot %s; registering again", self.worker_id)
            self._register()

    def close(self, deregister: bool = True) -> None:
        """Stop heartbeating; deregister (best effort) unless `deregister` is False."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if deregister and self.worker_id is not None:
            try:
                self._stub.Deregister(pb.DeregisterRequest(worker_id=self.worker_id),
                                      timeout=self._timeout)
            except grpc.RpcError as e:
                log.warning("deregister failed: %s", e.code())
        self._channel.close()

    def __enter__(self) -> "RegistryClient":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
