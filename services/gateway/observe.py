"""One request's spans and metrics at the gateway.

`RequestObserver` is made at the RPC's entry (REST or gRPC) and told what happens:
tokenized, routed, each token message, the prefill's and the decode's timings, the end.
It opens the GenAI span (`chat <model>`, semantic-convention attributes) with children
`route` and `completion`, gives the two legs' RPCs their parent context, and at the end
observes TTFT, TPOT, ITL, e2e and the TTFT parts into GatewayMetrics.

TTFT parts of a PD request (each measured where it happens, so they add up to the
TTFT minus the gateway's own tokenize/route time and the RPC hops):
  queue        prefill: arrival -> first chunk scheduled         (PrefillTimings.queue_s)
  prefill      prefill: computing the prompt                     (PrefillTimings.prefill_s)
  transfer     prefill: prompt done -> KV written into decode    (wait_transfer_s + transfer_s)
  first_decode decode: KV in place -> first token sent           (DecodeTimings.first_step_s)
"""
from __future__ import annotations

import time
from typing import Any

from opentelemetry.trace import Status, StatusCode

from pdmesh.telemetry import tracing
from pdmesh.telemetry.metrics import GatewayMetrics
from pdmesh.v1 import common_pb2 as cpb

_FINISH = {cpb.FINISH_REASON_STOP: "stop", cpb.FINISH_REASON_LENGTH: "length",
           cpb.FINISH_REASON_ABORT: "abort"}


class RequestObserver:
    """Spans and metrics of one request; every method is cheap when tracing is off."""

    def __init__(self, metrics: GatewayMetrics, endpoint: str, operation: str, model: str) -> None:
        self.metrics, self.endpoint = metrics, endpoint
        self.arrival = time.monotonic()
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.output_tokens = 0
        self.prompt_tokens = 0
        self.prefill_timings = None
        self.decode_timings = None
        self.span = tracing.start_span(f"{operation} {model}", {
            "gen_ai.operation.name": operation, "gen_ai.request.model": model,
            "gen_ai.system": "pdmesh", "gen_ai.provider.name": "pdmesh",
            "pdmesh.endpoint": endpoint})
        self.context = tracing.context_of(self.span)  # parent of route, legs, completion
        self._completion = None
        metrics.running.inc()

    def request(self, prompt_tokens: int, sampling: cpb.SamplingParams, room: int = 0) -> None:
        """The request as it will run: prompt length and sampling (GenAI attributes)."""
        self.prompt_tokens = prompt_tokens
        if not tracing.enabled():
            return
        attrs: dict[str, Any] = {"gen_ai.usage.input_tokens": prompt_tokens,
                                 "gen_ai.request.max_tokens": sampling.max_tokens}
        for field, key in (("temperature", "gen_ai.request.temperature"),
                           ("top_p", "gen_ai.request.top_p"), ("seed", "gen_ai.request.seed")):
            if sampling.HasField(field):
                attrs[key] = getattr(sampling, field)
        if sampling.top_k > 0:
            attrs["gen_ai.request.top_k"] = sampling.top_k
        self.span.set_attributes(attrs)

    def routed(self, route, room: int, mode: str, why: str) -> None:
        """The chosen pair and why (a zero-length `route` span with the details)."""
        if not tracing.enabled():
            return
        self.span.set_attributes({"gen_ai.response.id": str(room), "pdmesh.room": str(room)})
        attrs = {"pdmesh.route.mode": mode, "pdmesh.route.why": why,
                 "pdmesh.route.decode": route.decode.address,
                 "pdmesh.route.decode_id": route.decode.worker_id}
        if route.prefill is not None:
            attrs.update({"pdmesh.route.prefill": route.prefill.address,
                          "pdmesh.route.prefill_id": route.prefill.worker_id})
        # token-aware policies: e.g. pdmesh.route.prefill.match_rate, .balance_override
        attrs.update({f"pdmesh.route.{k}": v for k, v in getattr(route, "detail", ())})
        ticket = getattr(route, "ticket", None)  # --pd-mode: pd_mode, predicted TTFT, ...
        if ticket is not None:
            attrs.update({f"pdmesh.route.{k}": v for k, v in ticket.attributes().items()})
        now_ns = time.time_ns()
        tracing.start_span("route", attrs, context=self.context, start_ns=now_ns).end(now_ns)

    def tokens(self, n: int) -> None:
        """A token message with `n` tokens left the decode stream."""
        if n <= 0:
            return
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
            self._completion = tracing.start_span("completion", context=self.context)
        else:
            self.metrics.itl.observe(now - self.last_at)
        self.last_at = now
        self.output_tokens += n

    def prefill_done(self, timings) -> None:
        self.prefill_timings = timings

    def decode_first(self, timings) -> None:
        self.decode_timings = timings

    def finish(self, status: str, finish_reason: int = 0, usage: cpb.Usage | None = None) -> None:
        """The request ended with gRPC status name `status` ("OK" when it finished)."""
        now, m = time.monotonic(), self.metrics
        m.running.dec()
        m.requests.labels(self.endpoint, status).inc()
        if status == "OK":
            self._observe_latencies(now, usage)
        self._end_spans(status, finish_reason, usage)

    def _observe_latencies(self, now: float, usage: cpb.Usage | None) -> None:
        m = self.metrics
        out = usage.completion_tokens if usage is not None and usage.completion_tokens \
            else self.output_tokens
        m.prompt_tokens.inc(self.prompt_tokens)
        m.generation_tokens.inc(out)
        m.e2e.observe(now - self.arrival)
        if self.first_at is None:
            return
        ttft = self.first_at - self.arrival
        m.ttft.observe(ttft)
        if out > 1:
            m.tpot.observe((now - self.first_at) / (out - 1))
        p, d = self.prefill_timings, self.decode_timings
        if p is not None and d is not None:
            for part, v in (("queue", p.queue_s), ("prefill", p.prefill_s),
                            ("transfer", p.wait_transfer_s + p.transfer_s),
                            ("first_decode", d.first_step_s)):
                m.ttft_part.labels(part).observe(v)

    def _end_spans(self, status: str, finish_reason: int, usage: cpb.Usage | None) -> None:
        if not tracing.enabled():
            return
        attrs: dict[str, Any] = {"gen_ai.usage.output_tokens": self.output_tokens}
        if usage is not None and usage.completion_tokens:
            attrs["gen_ai.usage.output_tokens"] = usage.completion_tokens
        if finish_reason:
            attrs["gen_ai.response.finish_reasons"] = [_FINISH.get(finish_reason, "stop")]
        if self.first_at is not None:
            attrs["pdmesh.ttft_s"] = self.first_at - self.arrival
        if self._completion is not None:
            self._completion.set_attributes(attrs)
            self._completion.end()
        self.span.set_attributes(attrs)
        if status != "OK":
            self.span.set_status(Status(StatusCode.ERROR, status))
        self.span.end()
