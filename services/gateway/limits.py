"""Request limits and OpenAI parameters pdmesh does not implement.

A request the gateway cannot honour exactly is refused with a 400 (gRPC
INVALID_ARGUMENT) naming the parameter, never silently served differently: a client
that asks for `tools` or `response_format: json_object` and gets free text back would
not notice until it fails to parse the answer. The limits themselves live in
GatewayConfig (max_stop_strings, max_stop_chars, max_top_logprobs, max_body_bytes, max_n).
"""
from __future__ import annotations

from typing import Any, Callable

import grpc

from pdmesh.v1 import common_pb2 as cpb
from pdmesh.services.gateway.dispatch import GatewayError


def _absent(v: Any) -> bool:
    return v is None or v == [] or v == {}  # an empty list of tools asks for nothing


def _no_tool_call(v: Any) -> bool:
    return v is None or v == "none"


def _text_format(v: Any) -> bool:
    return v is None or v == {"type": "text"}


def _no_bias(v: Any) -> bool:
    return v is None or v == {}


def _one(v: Any) -> bool:
    return v is None or v == 1


def _no_suffix(v: Any) -> bool:
    return v is None or v == ""


def _text_only(v: Any) -> bool:
    return v is None or v == ["text"]


# OpenAI fields the protos do not carry (REST's JSON parser would drop them), by request
# message, with the values that mean "not used". Values the workers' SamplingParams
# cannot express are refused by the servicer (the field exists).
_COMMON: dict[str, Callable[[Any], bool]] = {"logit_bias": _no_bias}
UNSUPPORTED: dict[str, dict[str, Callable[[Any], bool]]] = {
    "pdmesh.v1.ChatCompletionRequest": {
        **_COMMON, "tools": _absent, "tool_choice": _no_tool_call, "functions": _absent,
        "function_call": _no_tool_call, "response_format": _text_format, "audio": _absent,
        "modalities": _text_only, "prediction": _absent},
    "pdmesh.v1.CompletionRequest": {**_COMMON, "best_of": _one, "suffix": _no_suffix},
}


class Unsupported(ValueError):
    """A request field pdmesh does not implement; `param` names it."""

    def __init__(self, param: str) -> None:
        super().__init__(f"'{param}' is not supported")
        self.param = param


def check_unsupported(payload: dict, message_name: str) -> None:
    """Raise Unsupported for the first field of `payload` (a REST body) that asks for
    something pdmesh does not do."""
    for name, unused in UNSUPPORTED.get(message_name, {}).items():
        if name in payload and not unused(payload[name]):
            raise Unsupported(name)


def _invalid(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, message)


def check_sampling(sp: cpb.SamplingParams, config: Any, logprobs_param: str) -> None:
    """Stop strings and logprobs within `config`'s limits (GatewayConfig): they cost the
    detokenizer a scan per token and the sampler a top-k per token, so they are bounded
    before the request reaches a worker."""
    if len(sp.stop) > config.max_stop_strings:
        raise _invalid(f"'stop' has {len(sp.stop)} strings; at most "
                       f"{config.max_stop_strings} are allowed")
    for s in sp.stop:
        if len(s) > config.max_stop_chars:
            raise _invalid(f"'stop' strings must be at most {config.max_stop_chars} "
                           f"characters, got one of {len(s)}")
    if sp.HasField("logprobs") and sp.logprobs > config.max_top_logprobs:
        raise _invalid(f"'{logprobs_param}' must be at most {config.max_top_logprobs}, "
                       f"got {sp.logprobs}")
    check_n(sp, config)


def check_n(sp: cpb.SamplingParams, config: Any) -> None:
    """n (choices) in [1, config.max_n]: each choice decodes a sequence of its own, so n
    multiplies what one request costs the decode worker."""
    if not sp.HasField("n"):
        return
    if sp.n < 1:
        raise _invalid(f"'n' must be at least 1, got {sp.n}")
    if sp.n > config.max_n:
        raise _invalid(f"'n' must be at most {config.max_n} (this gateway's limit, "
                       f"PDMESH_GATEWAY_MAX_N), got {sp.n}")


def body_too_large(limit: int, size: int | None) -> str:
    """The 413 message: what the limit is and how to raise it."""
    got = f" ({size} bytes)" if size else ""
    return (f"Request body too large{got}: the limit is {limit} bytes "
            f"(PDMESH_GATEWAY_MAX_BODY_BYTES)")
