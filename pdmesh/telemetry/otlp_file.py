"""Spans as OTLP/JSON lines: one ExportTraceServiceRequest per line, as the
OpenTelemetry Collector's `file` exporter writes them (ids in hex, per the OTLP/JSON
spec), so a file can be replayed into a collector (`otlpjsonfile` receiver) or Jaeger.

Several processes may append to one file: each batch is one `write` on an O_APPEND
descriptor, which Linux keeps whole for regular files.
"""
from __future__ import annotations

import base64
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from google.protobuf import json_format
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


class OtlpJsonLinesExporter(SpanExporter):
    """Appends each exported batch to `path` as one OTLP/JSON line."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()

    def export(self, spans: Sequence) -> SpanExportResult:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        doc = json_format.MessageToDict(encode_spans(spans))
        for rs in doc.get("resourceSpans", []):
            for ss in rs.get("scopeSpans", []):
                for s in ss.get("spans", []):
                    _hex_ids(s)
                    for link in s.get("links", []):
                        _hex_ids(link)
        line = (json.dumps(doc, separators=(",", ":")) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _hex_ids(obj: dict) -> None:
    """protobuf's JSON writes bytes as base64; OTLP/JSON wants trace and span ids in hex."""
    for key in ("traceId", "spanId", "parentSpanId"):
        if obj.get(key):
            obj[key] = base64.b64decode(obj[key]).hex()


@dataclass
class SpanRecord:
    """One span as read back from a file."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    service: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    status: str = "UNSET"
    children: list["SpanRecord"] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def read_spans(path: str) -> list[SpanRecord]:
    """Every span in an OTLP/JSON-lines file (ours, or a collector's file exporter's)."""
    spans = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
            if not isinstance(doc, dict):
                raise ValueError(f"{path}:{n}: not an OTLP ExportTraceServiceRequest object")
            spans.extend(_spans_of(doc))
    return spans


def _spans_of(doc: dict) -> Iterator[SpanRecord]:
    for rs in doc.get("resourceSpans", []):
        res = _attrs(rs.get("resource", {}).get("attributes", []))
        service = str(res.get("service.name", "?"))
        for ss in rs.get("scopeSpans", []):
            for s in ss.get("spans", []):
                yield SpanRecord(
                    trace_id=s.get("traceId", ""), span_id=s.get("spanId", ""),
                    parent_id=s.get("parentSpanId", ""), name=s.get("name", ""),
                    service=service, kind=s.get("kind", "SPAN_KIND_INTERNAL"),
                    start_ns=int(s.get("startTimeUnixNano", 0)),
                    end_ns=int(s.get("endTimeUnixNano", 0)),
                    attributes=_attrs(s.get("attributes", [])),
                    status=s.get("status", {}).get("code", "STATUS_CODE_UNSET"))


def _attrs(kvs: list[dict]) -> dict[str, Any]:
    out = {}
    for kv in kvs:
        v = kv.get("value", {})
        if "arrayValue" in v:
            out[kv["key"]] = [_scalar(x) for x in v["arrayValue"].get("values", [])]
        else:
            out[kv["key"]] = _scalar(v)
    return out


def _scalar(v: dict) -> Any:
    for key, conv in (("stringValue", str), ("intValue", int), ("doubleValue", float),
                      ("boolValue", bool)):
        if key in v:
            return conv(v[key])
    return None
