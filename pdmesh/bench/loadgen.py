"""Async streaming load generator for OpenAI-compatible endpoints (aiohttp).

Each request streams (SSE) with stream_options.include_usage; chunk arrival times are taken
with time.perf_counter exactly where sglang bench_serving 0.5.2 takes them (see metrics.py).
Fixed-concurrency runs keep `concurrency` requests in flight (a semaphore over all `number`
requests submitted at once); Poisson runs submit with exponential gaps of mean 1/rate.

    cfg = await resolve_model(ClientConfig("http://127.0.0.1:8000/v1"))
    summary, records = await run_fixed(cfg, Workload.load(WorkloadSpec()), 4, 16)
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import aiohttp
import numpy as np
from tqdm.auto import tqdm

from pdmesh.aio import freeze_startup_objects
from pdmesh.bench.metrics import RequestRecord, RunSummary, summarize
from pdmesh.bench.workload import BenchRequest, Workload

BACKENDS = ("completions", "chat")


@dataclass(frozen=True)
class ClientConfig:
    """Where and how to send: endpoint, auth, API flavour and request options."""
    base_url: str  # http://host:port/v1
    model: Optional[str] = None  # None: the first id of GET /models (resolve_model)
    api_key: Optional[str] = None
    backend: str = "completions"  # "completions" (/completions) or "chat" (/chat/completions)
    timeout_s: float = 300.0  # per request, total; a request past it is counted failed
    ignore_eos: bool = True
    min_tokens: bool = False  # also send min_tokens = max_tokens (vLLM/sglang/pdmesh know it)
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")

    def headers(self) -> dict[str, str]:
        """HTTP headers (Authorization when an api_key is set)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def url(self, path: str) -> str:
        """base_url joined with `path` ("models", "completions", ...)."""
        return self.base_url.rstrip("/") + "/" + path


async def resolve_model(cfg: ClientConfig) -> ClientConfig:
    """cfg with `model` set: unchanged when given, else the first id of GET {base_url}/models."""
    if cfg.model:
        return cfg
    timeout = aiohttp.ClientTimeout(total=min(cfg.timeout_s, 30.0))
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(cfg.url("models"), headers=cfg.headers()) as resp:
            if resp.status != 200:
                raise RuntimeError(f"GET {cfg.url('models')}: HTTP {resp.status}: "
                                   f"{(await resp.text())[:200]}")
            data = (await resp.json()).get("data") or []
    if not data:
        raise RuntimeError(f"GET {cfg.url('models')} listed no models; pass --model")
    return replace(cfg, model=data[0]["id"])


def build_payload(cfg: ClientConfig, req: BenchRequest) -> dict[str, Any]:
    """The JSON body for one streaming request."""
    body: dict[str, Any] = {"model": cfg.model, "max_tokens": req.output_tokens,
                            "temperature": cfg.temperature, "stream": True,
                            "stream_options": {"include_usage": True}}
    if cfg.backend == "chat":
        body["messages"] = list(req.messages) if req.messages is not None else \
            [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.min_tokens:
        body["min_tokens"] = req.output_tokens
    body.update(cfg.extra_body)
    return body


def _content(cfg: ClientConfig, data: dict[str, Any]) -> str:
    choices = data.get("choices") or []
    if not choices:
        return ""  # e.g. the usage-only last chunk
    if cfg.backend == "chat":
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


class _StreamError(Exception):
    """An error event inside an HTTP 200 stream."""


@dataclass
class _Timing:
    """Arrival times of one streamed response (perf_counter seconds)."""
    st: float
    ttft: float = 0.0
    latency: float = 0.0  # e2e: the last non-empty line, [DONE] included
    last: float = 0.0
    itl: list[float] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)


async def _read_stream(resp: aiohttp.ClientResponse, cfg: ClientConfig, t: _Timing) -> None:
    """Consume an SSE body, timing content chunks exactly as bench_serving 0.5.2 does."""
    async for raw in resp.content:
        line = raw.strip()
        if not line:
            continue
        t.latency = time.perf_counter() - t.st
        chunk = line.decode("utf-8").removeprefix("data: ")
        if chunk == "[DONE]" or chunk.startswith(":"):
            continue
        data = json.loads(chunk)
        if "error" in data:
            raise _StreamError(f"stream error: {str(data['error'])[:200]}")
        t.usage = data.get("usage") or t.usage
        if piece := _content(cfg, data):
            now = time.perf_counter()
            if not t.pieces:
                t.ttft = now - t.st
            else:
                t.itl.append(now - t.last)
            t.last = now
            t.pieces.append(piece)


async def send_request(session: aiohttp.ClientSession, cfg: ClientConfig, req: BenchRequest,
                       workload: Optional[Workload] = None) -> RequestRecord:
    """Stream one request and time it; never raises (failures become ok=False records)."""
    return (await send_request_text(session, cfg, req, workload))[0]


async def send_request_text(session: aiohttp.ClientSession, cfg: ClientConfig,
                            req: BenchRequest, workload: Optional[Workload] = None
                            ) -> tuple[RequestRecord, str]:
    """send_request, also returning the streamed text (multi-turn replies)."""
    t = _Timing(st=time.perf_counter())
    path = "chat/completions" if cfg.backend == "chat" else "completions"
    error = ""
    try:
        async with session.post(cfg.url(path), json=build_payload(cfg, req),
                                headers=cfg.headers()) as resp:
            if resp.status != 200:
                error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            else:
                await _read_stream(resp, cfg, t)
    except asyncio.TimeoutError:
        error = f"timeout after {cfg.timeout_s:g} s"
    except _StreamError as e:
        error = str(e)
    except Exception as e:  # connection reset, bad JSON, ...: count it, keep the run going
        error = f"{type(e).__name__}: {e}"
    if not error and not t.pieces:
        error = "stream ended without content"
    if error:
        return RequestRecord(False, error, req.prompt_tokens, 0, 0.0, 0.0, [], t.st,
                             turn=req.turn), ""
    text = "".join(t.pieces)
    out = t.usage.get("completion_tokens") or (
        workload.count_tokens(text) if workload else len(t.pieces))
    prompt = t.usage.get("prompt_tokens") or req.prompt_tokens
    cached = (t.usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return RequestRecord(True, "", int(prompt), int(out), t.ttft, t.latency, t.itl, t.st,
                         cached_tokens=int(cached), turn=req.turn), text


async def _run(cfg: ClientConfig, workload: Workload, reqs: Sequence[BenchRequest],
               gaps: Optional[np.ndarray], limit: Optional[int], desc: str,
               progress: bool) -> tuple[list[RequestRecord], float]:
    """Send `reqs` (after gaps[i] s each, None = all at once) with <= limit in flight."""
    freeze_startup_objects()  # the client's own full collections are not server latency
    sem = asyncio.Semaphore(limit) if limit else None
    bar = tqdm(total=len(reqs), desc=desc, disable=not progress, leave=False)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    conn = aiohttp.TCPConnector(limit=0, force_close=False)

    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        async def one(r: BenchRequest) -> RequestRecord:
            if sem is None:
                rec = await send_request(session, cfg, r, workload)
            else:
                async with sem:
                    rec = await send_request(session, cfg, r, workload)
            bar.update(1)
            return rec

        t0 = time.perf_counter()
        tasks = []
        for i, r in enumerate(reqs):
            tasks.append(asyncio.create_task(one(r)))
            if gaps is not None and i + 1 < len(reqs):
                await asyncio.sleep(float(gaps[i]))
        records = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - t0
    bar.close()
    return records, duration


async def warmup(cfg: ClientConfig, workload: Workload, n: int, progress: bool = False) -> None:
    """Send n requests at once (outputs capped at 16 tokens); raise if all of them fail."""
    if n <= 0:
        return
    reqs = [replace(r, output_tokens=min(r.output_tokens, 16))
            for r in workload.sample(n, seed=workload.spec.seed + 7919)]
    records, _ = await _run(cfg, workload, reqs, None, None, "warmup", progress)
    if not any(r.ok for r in records):
        raise RuntimeError(f"all {n} warm-up requests failed: {records[0].error}")


async def run_fixed(cfg: ClientConfig, workload: Workload, concurrency: int, number: int, *,
                    label: str = "", slo_ttft: Optional[float] = None,
                    slo_tpot: Optional[float] = None, warmup_requests: int = 0,
                    progress: bool = True) -> tuple[RunSummary, list[RequestRecord]]:
    """`number` requests with `concurrency` in flight; returns (summary, per-request records)."""
    if concurrency < 1 or number < 1:
        raise ValueError(f"concurrency and number must be >= 1, got {concurrency}, {number}")
    cfg = await resolve_model(cfg)
    await warmup(cfg, workload, warmup_requests)
    records, dur = await _run(cfg, workload, workload.sample(number), None, concurrency,
                              f"{label or 'bench'} c={concurrency}", progress)
    return summarize(records, dur, label=label, concurrency=concurrency,
                     slo_ttft=slo_ttft, slo_tpot=slo_tpot), records


async def run_rate(cfg: ClientConfig, workload: Workload, request_rate: float, number: int, *,
                   max_concurrency: Optional[int] = None, label: str = "",
                   slo_ttft: Optional[float] = None, slo_tpot: Optional[float] = None,
                   warmup_requests: int = 0, progress: bool = True
                   ) -> tuple[RunSummary, list[RequestRecord]]:
    """Poisson arrivals at `request_rate` req/s (inf = all at once), optional in-flight cap."""
    if not request_rate > 0 or number < 1:
        raise ValueError(f"request_rate must be > 0 and number >= 1, got {request_rate}, {number}")
    cfg = await resolve_model(cfg)
    await warmup(cfg, workload, warmup_requests)
    rng = np.random.RandomState(workload.spec.seed)
    gaps = None if np.isinf(request_rate) else rng.exponential(1.0 / request_rate, size=number)
    records, dur = await _run(cfg, workload, workload.sample(number), gaps, max_concurrency,
                              f"{label or 'bench'} rate={request_rate:g}", progress)
    return summarize(records, dur, label=label, concurrency=max_concurrency,
                     request_rate=request_rate, slo_ttft=slo_ttft, slo_tpot=slo_tpot), records
