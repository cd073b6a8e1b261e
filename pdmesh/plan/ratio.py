"""The ratio method's arithmetic (DESIGN.md, "Why PD disaggregation"): from one prefill
worker's and one decode worker's capacity at the SLO to xPyD for a target request rate,
with a KV-capacity check. Pure functions; `pdmesh plan` measures their inputs.

    P needed = ceil(target / prefill_rate)      D needed = ceil(target / decode_rate)
    decode concurrency per worker = target / D · (output - 1) · TPOT      (Little's law)
    KV check: that concurrency · (input + output) tokens <= the decode's KV tokens
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PrefillPoint:
    """One point of the prefill sweep (output length 1)."""

    concurrency: int
    req_s: float
    ttft: float  # the TTFT statistic compared with the SLO (mean by default)


@dataclass(frozen=True)
class DecodePoint:
    """One point of the decode sweep: a full batch of `batch` requests, released at once."""

    batch: int  # running requests at release (Decode.Stats)
    step_s: float  # decode step time = TPOT at this batch
    output_len: int  # tokens each request generates

    @property
    def gen_tok_s(self) -> float:
        """Generation throughput: one token per request per step."""
        return self.batch / self.step_s

    @property
    def req_s(self) -> float:
        """Requests/s one decode worker finishes at this batch: B / ((output - 1) · step)."""
        return self.batch / (max(1, self.output_len - 1) * self.step_s)


def prefill_capacity(points: list[PrefillPoint], slo_ttft: float) -> PrefillPoint | None:
    """The highest request rate among points whose TTFT meets the SLO (None: none does)."""
    ok = [p for p in points if p.ttft <= slo_ttft]
    return max(ok, key=lambda p: p.req_s) if ok else None


def decode_capacity(points: list[DecodePoint], slo_tpot: float) -> DecodePoint | None:
    """The highest request rate among points whose TPOT (step time) meets the SLO."""
    ok = [p for p in points if p.step_s <= slo_tpot]
    return max(ok, key=lambda p: p.req_s) if ok else None


@dataclass(frozen=True)
class Recommendation:
    prefill: int
    decode: int
    lines: tuple[str, ...]  # the arithmetic, for the operator

    @property
    def name(self) -> str:
        return f"{self.prefill}P{self.decode}D"


def recommend(target_rate: float, prefill_rate: float, decode: DecodePoint,
              input_len: int, output_len: int, kv_tokens: int,
              max_running: int) -> Recommendation:
    """xPyD for `target_rate` req/s, growing D until each decode's concurrency fits its KV
    pool and running limit. input_len/output_len: the largest a request may have."""
    if target_rate <= 0 or prefill_rate <= 0 or decode.req_s <= 0:
        raise ValueError("target rate and capacities must be > 0")
    p = math.ceil(target_rate / prefill_rate - 1e-9)
    d = math.ceil(target_rate / decode.req_s - 1e-9)
    lines = [f"prefill: {prefill_rate:.3f} req/s per worker at the TTFT SLO -> "
             f"P = ceil({target_rate:g} / {prefill_rate:.3f}) = {p}",
             f"decode: batch {decode.batch} at {decode.step_s * 1000:.1f} ms/step = "
             f"{decode.gen_tok_s:.1f} tok/s = {decode.batch} / (({decode.output_len} - 1) x "
             f"{decode.step_s:.4f} s) = {decode.req_s:.3f} req/s per worker -> "
             f"D = ceil({target_rate:g} / {decode.req_s:.3f}) = {d}"]
    per_req = input_len + output_len
    while True:
        conc = target_rate / d * max(1, output_len - 1) * decode.step_s
        need = math.ceil(conc) * per_req
        fits = need <= kv_tokens and math.ceil(conc) <= max_running
        lines.append(f"KV check ({d} decode): concurrency per decode = {target_rate:g} / {d} x "
                     f"{max(1, output_len - 1)} x {decode.step_s:.4f} s = {conc:.1f}; "
                     f"{math.ceil(conc)} x ({input_len} + {output_len}) = {need} tokens "
                     f"{'<=' if need <= kv_tokens else '>'} {kv_tokens} KV tokens, "
                     f"{math.ceil(conc)} {'<=' if math.ceil(conc) <= max_running else '>'} "
                     f"{max_running} running -> {'fits' if fits else 'add a decode worker'}")
        if fits:
            break
        d += 1
    lines.append(f"recommendation: {p}P{d}D for {target_rate:g} req/s")
    return Recommendation(p, d, tuple(lines))
