"""pdmesh.bench.scrape: TTFT parts read back from a gateway's /metrics text."""
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from prometheus_client import Counter

from pdmesh.bench.scrape import forward_steps, mean_parts_ms, ttft_part_totals


def _text(observations: dict[str, list[float]]) -> str:
    r = CollectorRegistry()
    h = Histogram("pdmesh_gateway_ttft_part_seconds", "parts", ["part"], registry=r)
    for part, values in observations.items():
        for v in values:
            h.labels(part=part).observe(v)
    return generate_latest(r).decode()


def test_mean_parts_between_two_scrapes():
    before = _text({"transfer": [1.0], "prefill_queue": [0.5]})
    after = _text({"transfer": [1.0, 0.010, 0.030], "prefill_queue": [0.5]})
    total, count = ttft_part_totals(after)["transfer"]
    assert count == 3.0 and abs(total - 1.04) < 1e-9
    # only what happened between the scrapes: 10 and 30 ms; no new queue samples
    parts = mean_parts_ms(after, before)
    assert list(parts) == ["transfer"] and abs(parts["transfer"] - 20.0) < 1e-6
    assert mean_parts_ms(after)["prefill_queue"] == 500.0


def test_forward_steps_by_kind():
    r = CollectorRegistry()
    Counter("pdmesh_worker_prefill_steps", "p", registry=r).inc(3)
    Counter("pdmesh_worker_decode_steps", "d", registry=r).inc(120)
    Counter("pdmesh_worker_generation_tokens", "g", registry=r).inc(7)
    assert forward_steps(generate_latest(r).decode()) == {"prefill": 3, "decode": 120}
    assert forward_steps("") == {}
