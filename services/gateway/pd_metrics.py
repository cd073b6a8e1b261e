"""Metrics of per-request disaggregation (services/gateway/pd_mode.py), on the gateway's
registry: requests per choice, predicted vs measured TTFT, and the cost model's
coefficients as they are calibrated."""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from pdmesh.telemetry.metrics import LATENCY_BUCKETS


class PdModeMetrics:
    """Requests per choice and predicted vs measured TTFT, on the gateway's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("pdmesh_gateway_pd_mode_requests", "Routed requests "
                                "(attempts) by where their prompt is prefilled: remote "
                                "(a prefill worker) or local (the decode worker)",
                                ["pd_mode"], registry=registry)
        self.ttft = Histogram("pdmesh_gateway_pd_mode_ttft_seconds", "Routing to first "
                              "token at the gateway: predicted at routing, and measured",
                              ["pd_mode", "source"], buckets=LATENCY_BUCKETS,
                              registry=registry)
        self.error = Histogram("pdmesh_gateway_pd_mode_ttft_error_seconds", "|measured - "
                               "predicted| TTFT per request", ["pd_mode"],
                               buckets=LATENCY_BUCKETS, registry=registry)
        self.registry = registry

    def watch(self, decider: Any) -> None:
        """Also export the cost model's coefficients as they are calibrated (this process's;
        read at scrape time)."""
        self.registry.register(_ModelCollector(decider))


class _ModelCollector:
    """The decider's coefficients, read at scrape time (a custom collector: per process)."""

    def __init__(self, decider: Any) -> None:
        self.decider = decider

    def collect(self):
        g = GaugeMetricFamily("pdmesh_gateway_pd_mode_model", "The pd-mode cost model's "
                              "coefficients now: prefill_scale (measured / profile), "
                              "prefill_a s, prefill_b s/token, bandwidth bytes/s, "
                              "overhead_remote s, overhead_local s", labels=["coefficient"])
        for name, value in self.decider.coefficients().items():
            g.add_metric([name], value)
        yield g

    def describe(self):
        return []
