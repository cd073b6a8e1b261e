"""A worker's metrics endpoint and periodic summary line.

The servicer provides `snapshot() -> dict` (the engine's last published stats; never waits):
running, queued, used_pages, free_pages, num_pages, page_size, prompt_tokens and
generation_tokens (cumulative), plus role-specific counters. Prometheus reads it at
scrape time; the summary thread reads it every `log_interval_s` and logs one line in
the shape operators of SGLang-style servers read every day:

    Decode batch. #running-req: 12, #token: 5360, token usage: 0.08, gen throughput (token/s): 210.4, #queue-req: 0
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Mapping

from pdmesh.config import TelemetryConfig
from pdmesh.telemetry.metrics import AioRpcMetricsInterceptor, SnapshotCollector, serve_http

log = logging.getLogger("pdmesh.worker")
Snapshot = Callable[[], Mapping[str, float]]

# metric name -> (kind, help, snapshot key); keys a role lacks are skipped
WORKER_SPECS = {
    "pdmesh_worker_running_requests": ("gauge", "Requests prefilling or decoding", "running"),
    "pdmesh_worker_queued_requests": ("gauge", "Requests waiting to be scheduled (decode: "
                                      "incl. those waiting for pages or KV)", "queued"),
    "pdmesh_worker_kv_pages_used": ("gauge", "KV pages in use", "used_pages"),
    "pdmesh_worker_kv_pages_free": ("gauge", "KV pages free", "free_pages"),
    "pdmesh_worker_kv_pages_total": ("gauge", "KV pages in the pool", "num_pages"),
    "pdmesh_decode_kv_pages_quarantined": ("gauge", "Decode pages a prefill may still be "
                                           "writing (freed on its confirmation or expiry)",
                                           "quarantined_pages"),
    "pdmesh_worker_prompt_tokens": ("counter", "Prompt tokens computed (prefill)",
                                    "prompt_tokens"),
    "pdmesh_worker_generation_tokens": ("counter", "Tokens sampled by decode steps",
                                        "generation_tokens"),
    "pdmesh_worker_prefill_throughput_tokens_per_second": (
        "gauge", "Prompt tokens computed per second over the last summary interval",
        "prefill_tok_s"),
    "pdmesh_worker_decode_throughput_tokens_per_second": (
        "gauge", "Tokens generated per second over the last summary interval", "decode_tok_s"),
    "pdmesh_worker_kv_pages_reserved": ("gauge", "KV pages promised to admitted prompts' "
                                        "prefill, not yet allocated", "reserved_pages"),
    "pdmesh_worker_kv_pages_estimated": ("gauge", "KV pages running requests are expected "
                                         "to still take (admission's estimate; not "
                                         "reserved)", "estimated_pages"),
    "pdmesh_worker_retracted_requests": ("counter", "Requests preempted (pages freed, "
                                         "recomputed later) because the pool ran short",
                                         "retracted"),
    "pdmesh_decode_prealloc_queue": ("gauge", "Decode rooms waiting for KV pages "
                                     "(pre-allocation queue)", "prealloc_queue"),
    "pdmesh_prefill_kv_writes_queued": ("gauge", "KV writes waiting for a writer thread",
                                        "kv_writes_queued"),
    "pdmesh_prefill_ahead_pages": ("gauge", "Prefill pages of rooms computed before their "
                                   "decode had pages (the compute-ahead budget in use)",
                                   "ahead_pages"),
    "pdmesh_prefill_deferred_rooms": ("gauge", "Rooms waiting for their decode's Transfer "
                                      "before computing (compute-ahead budget full)",
                                      "deferred_rooms"),
    "pdmesh_worker_prefill_steps": ("counter", "Forward steps that computed prompts",
                                    "prefill_steps"),
    "pdmesh_worker_decode_steps": ("counter", "Forward steps that sampled one token for "
                                   "each decoding request", "decode_steps"),
    "pdmesh_worker_finished_requests": ("counter", "Requests finished here", "finished"),
    "pdmesh_worker_failed_requests": ("counter", "Requests failed here", "failed"),
}


class WorkerObservability:
    """Metrics registry + RPC counter interceptor + /metrics server + summary thread."""

    def __init__(self, registry, config: TelemetryConfig, role: str) -> None:
        self.registry, self.config, self.role = registry, config, role
        self.aio_rpc_interceptor = AioRpcMetricsInterceptor(registry, "pdmesh_worker")
        self._snapshot: Snapshot | None = None
        self._rates = {"prefill_tok_s": 0.0, "decode_tok_s": 0.0}
        self._stop = threading.Event()
        self.metrics_port: int | None = None

    def start(self, snapshot: Snapshot, host: str) -> "WorkerObservability":
        """Begin serving /metrics (unless metrics_port is -1) and logging summaries."""
        self._snapshot = snapshot
        self.registry.register(SnapshotCollector(self.snapshot, WORKER_SPECS))
        if self.config.metrics_port >= 0:
            self.metrics_port = serve_http(self.registry, host, self.config.metrics_port)
        if self.config.log_interval_s > 0:
            threading.Thread(target=self._summaries, name="summary", daemon=True).start()
        return self

    def snapshot(self) -> dict[str, float]:
        """The servicer's snapshot plus the throughputs of the last interval."""
        return {**self._snapshot(), **self._rates}

    def _summaries(self) -> None:
        last, t_last = self._snapshot(), time.monotonic()
        while not self._stop.wait(self.config.log_interval_s):
            try:
                snap, now = self._snapshot(), time.monotonic()
            except Exception as e:  # engine loop stopping: no summary this time
                log.debug("summary skipped: %s", e)
                continue
            dt = max(now - t_last, 1e-9)
            self._rates = {
                "prefill_tok_s": (snap["prompt_tokens"] - last["prompt_tokens"]) / dt,
                "decode_tok_s": (snap["generation_tokens"] - last["generation_tokens"]) / dt}
            if _active(snap, last):
                log.info(summary_line(self.role, snap, self._rates))
            last, t_last = snap, now

    def stop(self) -> None:
        self._stop.set()


def _active(snap: Mapping[str, float], last: Mapping[str, float]) -> bool:
    """Log only when something runs, waits, or happened since the last line."""
    return bool(snap["running"] or snap["queued"] or
                snap["prompt_tokens"] != last["prompt_tokens"] or
                snap["generation_tokens"] != last["generation_tokens"])


def summary_line(role: str, s: Mapping[str, float], rates: Mapping[str, float]) -> str:
    """One line of a worker's state, SGLang-style (tokens = KV tokens in use)."""
    tokens = int(s["used_pages"] * s["page_size"])
    usage = s["used_pages"] / max(1, s["num_pages"])
    if role == "prefill":
        return (f"Prefill batch. #running-req: {s['running']}, #queue-req: {s['queued']}, "
                f"#token: {tokens}, token usage: {usage:.2f}, "
                f"input throughput (token/s): {rates['prefill_tok_s']:.2f}, "
                f"#transferred-req: {s.get('finished', 0)}, #failed-req: {s.get('failed', 0)}")
    line = (f"Decode batch. #running-req: {s['running']}, #token: {tokens}, "
            f"token usage: {usage:.2f}, gen throughput (token/s): {rates['decode_tok_s']:.2f}, "
            f"#queue-req: {s['queued']}")
    if role == "colocated":
        line += f", input throughput (token/s): {rates['prefill_tok_s']:.2f}"
    return line + f", #quarantined-pages: {s.get('quarantined_pages', 0)}"
