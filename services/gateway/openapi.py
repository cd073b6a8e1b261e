"""The gateway's OpenAPI 3 document (`GET /openapi.json`), generated at start-up.

Nothing here is hand-written per endpoint: the paths and verbs are the services'
`google.api.http` annotations (the same `http_routes` the transcoder serves), the
request and response bodies are JSON Schemas derived from the message descriptors, as
`json_format` reads and the transcoder writes them (OpenAI's snake_case names, 64-bit
integers as numbers, google.protobuf.Value as any JSON value). Added to that:
- the few constraints the gateway checks before anything else (REQUIRED: `messages`,
  `prompt`), so a client generator knows them;
- the documented errors, OpenAI's error JSON: 400 (bad input), 401 (API key), 404
  (unknown model or URL), 413 (body over --max-body-bytes), 429 (admission, with
  Retry-After) and 503 (no worker can serve);
- streaming methods answer `text/event-stream` when the request says `stream: true`.
Each operation names its gRPC method (`x-grpc-method`), so the document also maps REST
onto the native API. Fuzzing runs against it (benchmarks/fuzz.py, tests/test_fuzz.py).
"""
from __future__ import annotations

import re
from typing import Any

from google.protobuf import descriptor as _d

from pdmesh.services.gateway.transcoder import http_routes

_F = _d.FieldDescriptor
_INT_RANGE = {
    _F.TYPE_INT32: (-(1 << 31), (1 << 31) - 1), _F.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
    _F.TYPE_SFIXED32: (-(1 << 31), (1 << 31) - 1), _F.TYPE_UINT32: (0, (1 << 32) - 1),
    _F.TYPE_FIXED32: (0, (1 << 32) - 1), _F.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    _F.TYPE_SINT64: (-(1 << 63), (1 << 63) - 1), _F.TYPE_SFIXED64: (-(1 << 63), (1 << 63) - 1),
    _F.TYPE_UINT64: (0, (1 << 64) - 1), _F.TYPE_FIXED64: (0, (1 << 64) - 1),
}
# well-known types, as proto3 JSON writes them
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Value": {"description": "any JSON value"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
}
# what the gateway requires before it looks at anything else (a request without them is
# a 400 naming the field)
REQUIRED = {"pdmesh.v1.ChatCompletionRequest": ["messages"],
            "pdmesh.v1.CompletionRequest": ["prompt"]}
ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {
            "message": {"type": "string", "description": "what was wrong"},
            "type": {"type": "string", "description": "invalid_request_error, "
                     "authentication_error, rate_limit_error, service_unavailable_error"},
            "param": {"type": ["string", "null"], "description": "the field at fault"},
            "code": {"type": ["string", "integer", "null"]},
        }}},
}
_ERRORS = {
    "400": "Invalid request: malformed JSON, a field of the wrong type or out of range, "
           "an unsupported OpenAI parameter, the prompt plus max_tokens over the context "
           "length, or a request limit (stop strings, logprobs) exceeded",
    "401": "Missing or wrong API key (Authorization: Bearer KEY), when the gateway has one",
    "404": "Unknown model (or URL)",
    "413": "Request body larger than the gateway's --max-body-bytes",
    "429": "Too many requests in flight and queued (admission); retry after Retry-After "
           "seconds",
    "503": "No worker can serve the request now (none registered, or the mesh failed it)",
}
_GET_ERRORS = ("401", "503")


def _ref(desc: _d.Descriptor) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{desc.full_name}"}


def _field_schema(f: _d.FieldDescriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    """One field's JSON Schema (without `repeated`)."""
    if f.type in _INT_RANGE:
        lo, hi = _INT_RANGE[f.type]
        return {"type": "integer", "minimum": lo, "maximum": hi}
    if f.type in (_F.TYPE_DOUBLE, _F.TYPE_FLOAT):
        return {"type": "number"}
    if f.type == _F.TYPE_BOOL:
        return {"type": "boolean"}
    if f.type == _F.TYPE_STRING:
        return {"type": "string"}
    if f.type == _F.TYPE_BYTES:
        return {"type": "string", "contentEncoding": "base64"}
    if f.type == _F.TYPE_ENUM:
        return {"type": "string", "enum": [v.name for v in f.enum_type.values]}
    mt = f.message_type
    if mt.full_name in _WELL_KNOWN:
        return dict(_WELL_KNOWN[mt.full_name])
    if mt.GetOptions().map_entry:
        return {"type": "object",
                "additionalProperties": _field_schema(mt.fields_by_name["value"], schemas)}
    _message_schema(mt, schemas)
    return _ref(mt)


def _message_schema(desc: _d.Descriptor, schemas: dict[str, Any]) -> None:
    """Add `desc` (and every message it uses) to `schemas`, keyed by full name."""
    if desc.full_name in schemas:
        return
    schemas[desc.full_name] = {}  # placeholder: recursive messages end here
    props: dict[str, Any] = {}
    for f in desc.fields:
        s = _field_schema(f, schemas)
        if f.is_repeated and not (f.message_type and f.message_type.GetOptions().map_entry):
            s = {"type": "array", "items": s}
        if f.has_presence and f.message_type is None:
            s["description"] = "optional: absent or null means the default"
        props[f.name] = s
    schema: dict[str, Any] = {"type": "object", "properties": props,
                              "x-protobuf-message": desc.full_name}
    if desc.full_name in REQUIRED:
        schema["required"] = REQUIRED[desc.full_name]
    schemas[desc.full_name] = schema


def openapi_document(services: list[_d.ServiceDescriptor], *, title: str = "pdmesh gateway",
                     version: str = "0.1.0", api_key: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every annotated method of `services`. `api_key`:
    the gateway requires a bearer key (every operation says so)."""
    schemas: dict[str, Any] = {"Error": ERROR_SCHEMA}
    paths: dict[str, Any] = {}
    for service in services:
        for route in http_routes(service):
            m = route.method
            _message_schema(m.input_type, schemas)
            _message_schema(m.output_type, schemas)
            ok: dict[str, Any] = {"application/json": {"schema": _ref(m.output_type)}}
            if m.server_streaming and "stream" in m.input_type.fields_by_name:
                ok["text/event-stream"] = {"schema": {
                    "type": "string", "description": "with `stream: true`: one `data: "
                    f"<{m.output_type.name} JSON>` event per chunk, then `data: [DONE]`"}}
            errors = _ERRORS if route.body else {k: _ERRORS[k] for k in _GET_ERRORS}
            op: dict[str, Any] = {
                "operationId": m.name,
                "summary": f"{service.full_name}.{m.name}",
                "x-grpc-method": f"/{service.full_name}/{m.name}",
                "responses": {
                    "200": {"description": m.output_type.name, "content": ok},
                    **{code: {"description": text,
                              "content": {"application/json": {
                                  "schema": {"$ref": "#/components/schemas/Error"}}}}
                       for code, text in errors.items()},
                },
            }
            if route.body:
                op["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": _ref(m.input_type)}}}
            if api_key and m.name != "Health":
                op["security"] = [{"bearerAuth": []}]
            paths.setdefault(_openapi_path(route.path), {})[route.verb.lower()] = op
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "OpenAI-compatible REST, transcoded from the gRPC API "
                                "(protos/pdmesh/v1) by its google.api.http annotations"},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if api_key:
        doc["components"]["securitySchemes"] = {"bearerAuth": {"type": "http",
                                                               "scheme": "bearer"}}
    return doc


def _openapi_path(path: str) -> str:
    """google.api.http `{name=pattern}` path variables as OpenAPI `{name}`."""
    return re.sub(r"\{([^}=]+)(=[^}]*)?\}", r"{\1}", path)
