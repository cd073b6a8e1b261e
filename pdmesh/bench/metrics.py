"""Benchmark data model and metric definitions (sglang bench_serving 0.5.2 semantics).

Definitions (all times in seconds, measured with time.perf_counter on the client):
- TTFT: send -> first streamed chunk with non-empty content (text / delta.content).
- e2e latency: send -> last streamed line (the `[DONE]` line when the server sends one).
- TPOT (per request): (e2e - TTFT) / (output_tokens - 1), only requests with > 1 output token.
- ITL: gaps between consecutive content chunks, pooled over all completed requests.
- output_tokens: usage.completion_tokens when the server reports it, else the tokenizer count.
- throughputs: totals over completed requests / run duration (first send -> last finish).
- goodput: completed requests meeting every given SLO (TTFT <= slo_ttft, TPOT <= slo_tpot)
  per second of run duration; slo_attainment: that count / all requests of the run.
- cached_tokens: usage.prompt_tokens_details.cached_tokens (prompt tokens the server took
  from its prefix cache); cache hit rate = sum(cached_tokens) / sum(prompt_tokens) over
  completed requests (0 when there are none).
- per turn (multi-turn runs, records with turn >= 1): the same TTFT Dist, tokens and hit
  rate over the requests of each turn index (TurnStats).
- Dist percentiles: numpy.percentile (linear interpolation), like bench_serving; an empty
  sample gives all-zero Dist (bench_serving's `np.mean(x or 0)` behaviour).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Dist:
    """Summary of one metric's sample: mean, median, P90, P99 (seconds or ratio)."""
    mean: float
    median: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Iterable[float]) -> "Dist":
        """Summarize `values` with numpy (linear-interpolated percentiles); empty -> zeros."""
        arr = np.asarray(list(values), dtype=np.float64)
        if arr.size == 0:
            return cls(0.0, 0.0, 0.0, 0.0)
        return cls(float(np.mean(arr)), float(np.median(arr)),
                   float(np.percentile(arr, 90)), float(np.percentile(arr, 99)))


@dataclass(frozen=True)
class RequestRecord:
    """One benchmark request as the client saw it.

    start: absolute time.perf_counter() at send; ttft/e2e: seconds relative to start;
    itl: gaps (s) between consecutive content chunks (len == content chunks - 1).
    For failed requests ok=False, error holds the reason and timing fields are 0.
    """
    ok: bool
    error: str
    prompt_tokens: int
    output_tokens: int
    ttft: float
    e2e: float
    itl: list[float] = field(default_factory=list)
    start: float = 0.0
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens
    turn: int = 0  # multi-turn: 1-based turn index in its conversation; 0 otherwise

    @property
    def end(self) -> float:
        """Absolute perf_counter time the request finished."""
        return self.start + self.e2e

    @property
    def tpot(self) -> Optional[float]:
        """(e2e - TTFT) / (output_tokens - 1); None unless ok and output_tokens > 1."""
        if not self.ok or self.output_tokens <= 1:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class TurnStats:
    """One turn index of a multi-turn run: its requests' TTFT and prefix-cache hits."""
    turn: int
    completed: int
    failed: int
    ttft: Dist
    prompt_tokens: int
    cached_tokens: int
    hit_rate: float  # cached_tokens / prompt_tokens (0 when no prompt tokens)


def per_turn(records: Sequence[RequestRecord]) -> tuple[TurnStats, ...]:
    """TurnStats for each turn index >= 1 present in `records`, in turn order."""
    out = []
    for k in sorted({r.turn for r in records if r.turn >= 1}):
        rs = [r for r in records if r.turn == k]
        done = [r for r in rs if r.ok]
        tin = sum(r.prompt_tokens for r in done)
        cached = sum(r.cached_tokens for r in done)
        out.append(TurnStats(k, len(done), len(rs) - len(done), Dist.of(r.ttft for r in done),
                             tin, cached, cached / tin if tin else 0.0))
    return tuple(out)


@dataclass(frozen=True)
class RunSummary:
    """Aggregate of one run (one concurrency level or one request rate).

    request_rate is None for fixed-concurrency runs; concurrency is None for unbounded
    Poisson runs. goodput_req_s / slo_attainment are None when no SLO was given.
    """
    label: str
    concurrency: Optional[int]
    request_rate: Optional[float]
    number: int
    completed: int
    failed: int
    duration_s: float
    req_s: float
    input_tok_s: float
    output_tok_s: float
    total_tok_s: float
    ttft: Dist
    tpot: Dist
    itl: Dist
    e2e: Dist
    goodput_req_s: Optional[float]
    slo_attainment: Optional[float]
    # additive fields (defaults keep older JSON readable)
    total_input_tokens: int = 0
    total_output_tokens: int = 0
    slo_ttft: Optional[float] = None
    slo_tpot: Optional[float] = None
    avg_concurrency: float = 0.0  # sum(e2e) / duration, bench_serving's "Concurrency"
    errors: tuple[str, ...] = ()  # up to 5 distinct error messages of failed requests
    total_cached_tokens: int = 0  # sum of usage cached_tokens (prefix cache hits)
    cache_hit_rate: float = 0.0  # total_cached_tokens / total_input_tokens
    per_turn: tuple[TurnStats, ...] = ()  # multi-turn runs only


def meets_slo(rec: RequestRecord, slo_ttft: Optional[float], slo_tpot: Optional[float]) -> bool:
    """True when `rec` completed and meets every given SLO (TPOT counts as 0 for <= 1 token)."""
    if not rec.ok:
        return False
    if slo_ttft is not None and rec.ttft > slo_ttft:
        return False
    tpot = rec.tpot or 0.0
    return slo_tpot is None or tpot <= slo_tpot


def run_duration(records: Sequence[RequestRecord]) -> float:
    """First send -> last finish over `records` (0 when empty)."""
    if not records:
        return 0.0
    return max(r.end for r in records) - min(r.start for r in records)


def summarize(records: Sequence[RequestRecord], duration: Optional[float] = None, *,
              label: str = "", concurrency: Optional[int] = None,
              request_rate: Optional[float] = None, slo_ttft: Optional[float] = None,
              slo_tpot: Optional[float] = None) -> RunSummary:
    """Aggregate `records` of one run into a RunSummary (definitions in the module doc).

    duration: the run's wall time in seconds; None derives it from the records.
    """
    done = [r for r in records if r.ok]
    dur = duration if duration is not None else run_duration(records)
    dur = max(dur, 1e-9)
    tin = sum(r.prompt_tokens for r in done)
    tout = sum(r.output_tokens for r in done)
    cached = sum(r.cached_tokens for r in done)
    tpots = [t for t in (r.tpot for r in done) if t is not None]
    itls = [g for r in done for g in r.itl]
    has_slo = slo_ttft is not None or slo_tpot is not None
    good = sum(meets_slo(r, slo_ttft, slo_tpot) for r in records) if has_slo else 0
    errors = tuple(dict.fromkeys(r.error for r in records if not r.ok))[:5]
    return RunSummary(
        label=label, concurrency=concurrency, request_rate=request_rate,
        number=len(records), completed=len(done), failed=len(records) - len(done),
        duration_s=dur, req_s=len(done) / dur, input_tok_s=tin / dur,
        output_tok_s=tout / dur, total_tok_s=(tin + tout) / dur,
        ttft=Dist.of(r.ttft for r in done), tpot=Dist.of(tpots), itl=Dist.of(itls),
        e2e=Dist.of(r.e2e for r in done),
        goodput_req_s=good / dur if has_slo else None,
        slo_attainment=(good / len(records) if records else 0.0) if has_slo else None,
        total_input_tokens=tin, total_output_tokens=tout, slo_ttft=slo_ttft,
        slo_tpot=slo_tpot, avg_concurrency=sum(r.e2e for r in done) / dur, errors=errors,
        total_cached_tokens=cached, cache_hit_rate=cached / tin if tin else 0.0,
        per_turn=per_turn(records))
