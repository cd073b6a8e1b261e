"""Figures read from a running mesh's Prometheus endpoints, for the benchmarks."""
from __future__ import annotations

import re
import urllib.request

_PART = re.compile(r'^pdmesh_gateway_ttft_part_seconds_(sum|count)\{part="([^"]+)"\} (\S+)', re.M)


def fetch(url: str, timeout: float = 10.0) -> str:
    """The text of a /metrics page."""
    return urllib.request.urlopen(url, timeout=timeout).read().decode()


def ttft_part_totals(text: str) -> dict[str, tuple[float, float]]:
    """part -> (sum of seconds, count) of `pdmesh_gateway_ttft_part_seconds` (PD requests:
    prefill queue, prefill compute, KV transfer incl. waiting for the decode, first decode)."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for kind, part, value in _PART.findall(text):
        (sums if kind == "sum" else counts)[part] = float(value)
    return {k: (sums[k], counts.get(k, 0.0)) for k in sums}


def forward_steps(text: str) -> dict[str, int]:
    """{"prefill": n, "decode": n}: a worker's forward steps so far, by kind, from its
    /metrics text (`pdmesh_worker_{prefill,decode}_steps_total`); a kind it lacks is left out."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for kind in ("prefill", "decode"):
            if fam.name == f"pdmesh_worker_{kind}_steps":
                out[kind] = int(sum(s.value for s in fam.samples if s.name.endswith("_total")))
    return out


def mean_parts_ms(after: str, before: str = "") -> dict[str, float]:
    """Mean ms of each TTFT part over the requests between two scrapes of one gateway."""
    a, b = ttft_part_totals(after), ttft_part_totals(before)
    out = {}
    for part, (s, n) in a.items():
        s0, n0 = b.get(part, (0.0, 0.0))
        if n > n0:
            out[part] = 1e3 * (s - s0) / (n - n0)
    return out
