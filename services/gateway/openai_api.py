"""OpenAI request -> (prompt ids, SamplingParams) and Deltas -> OpenAI response messages.

Validation raises GatewayError(INVALID_ARGUMENT / NOT_FOUND) with a message that
says what is wrong; the servicer turns it into a gRPC status, REST into a 4xx.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import grpc
from google.protobuf import struct_pb2

from pdmesh.runtime import detokenizer
from pdmesh.v1 import common_pb2 as cpb
from pdmesh.v1 import openai_pb2 as opb
from pdmesh.services.gateway import limits
from pdmesh.services.gateway.choices import RequestUsage, choice_count
from pdmesh.services.gateway.dispatch import Delta, GatewayError, ModelInfo

FINISH = {cpb.FINISH_REASON_STOP: "stop", cpb.FINISH_REASON_LENGTH: "length",
          cpb.FINISH_REASON_ABORT: "abort"}
_SHARED = ("temperature", "top_p", "seed", "repetition_penalty", "skip_special_tokens", "n")
_PLAIN = ("presence_penalty", "frequency_penalty", "ignore_eos", "min_tokens", "top_k",
          "min_p")
log = logging.getLogger(__name__)


def invalid(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, message)


def check_model(model: str, info: ModelInfo) -> None:
    """Empty or the served name; NOT_FOUND otherwise (OpenAI's 404 model_not_found)."""
    if model and model != info.name:
        raise GatewayError(grpc.StatusCode.NOT_FOUND,
                           f"The model `{model}` does not exist (served: {info.name}).")


def value_to_py(value: struct_pb2.Value) -> Any:
    """A google.protobuf.Value as Python (None, float, str, bool, dict, list). Unlike
    json_format.MessageToDict it takes any value a gRPC client can send: a NaN or an
    infinite number_value (which MessageToDict refuses with a ValueError: a 500 before)
    is returned as the float, for the caller's type checks to refuse."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {k: value_to_py(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [value_to_py(v) for v in value.list_value.values]
    return None  # null_value or unset


def value_strings(value: struct_pb2.Value, name: str) -> list[str]:
    """A google.protobuf.Value that is null, a string or a list of strings."""
    v = value_to_py(value)
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return v
    raise invalid(f"'{name}' must be a string or a list of strings, got {v!r}")


def message_content(msg: opb.ChatMessage, i: int) -> str:
    """Content as text: a string, or the text parts of a list joined."""
    kind = msg.content.WhichOneof("kind")
    if kind == "string_value":
        return msg.content.string_value
    if kind == "list_value":
        parts = value_to_py(msg.content)
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
               for p in parts):
            return "".join(p["text"] for p in parts)
        raise invalid(f"messages[{i}].content: only text parts are supported")
    if kind == "null_value" or kind is None:
        return ""
    raise invalid(f"messages[{i}].content must be a string or a list of parts")


def chat_prompt(messages, info: ModelInfo) -> list[int]:
    """Apply the chat template; INVALID_ARGUMENT for empty or malformed conversations."""
    if not messages:
        raise invalid("'messages' must be a non-empty list")
    convo: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not m.role:
            raise invalid(f"messages[{i}].role is required")
        d = {"role": m.role, "content": message_content(m, i)}
        if m.name:
            d["name"] = m.name
        convo.append(d)
    try:
        return info.tokenizer.apply_chat_template(convo)
    except ValueError as e:
        raise invalid(str(e)) from None


def completion_prompt(prompt: struct_pb2.Value, info: ModelInfo) -> list[int]:
    """A string or a list of token ids (or a list holding exactly one of those)."""
    v = value_to_py(prompt)
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]
    if isinstance(v, str) and v:
        return info.tokenizer.encode(v)
    if isinstance(v, list) and v and all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
            and t == int(t) and t >= 0 for t in v):
        return check_token_ids([int(t) for t in v], info, "prompt")
    raise invalid("'prompt' must be a non-empty string or a list of token ids "
                  "(one prompt per request)")


def check_token_ids(ids: list[int], info: ModelInfo, name: str) -> list[int]:
    """`ids` when every one is in the model's vocabulary; INVALID_ARGUMENT otherwise (an id
    past it would reach the tokenizer and the workers' protos: 1e30 did, as a 500)."""
    limit = info.vocab_size or (1 << 32)
    bad = [t for t in ids if not 0 <= t < limit]
    if bad:
        raise invalid(f"'{name}' holds token ids outside the vocabulary [0, {limit}): "
                      f"{bad[:5]}")
    return ids


def sampling(req, prompt_len: int, info: ModelInfo, max_tokens: int | None,
             logprobs: int | None, config: Any = None,
             logprobs_param: str = "logprobs") -> cpb.SamplingParams:
    """SamplingParams from a Chat/CompletionRequest; checks the context limit and
    `config`'s request limits (GatewayConfig; `logprobs_param`: the field's name)."""
    if max_tokens is None:
        max_tokens = info.max_model_len - prompt_len
    if max_tokens < 1:
        raise invalid(f"max_tokens must be at least 1, got {max_tokens}"
                      if prompt_len < info.max_model_len else _too_long(prompt_len, 1, info))
    if prompt_len + max_tokens > info.max_model_len:
        raise invalid(_too_long(prompt_len, max_tokens, info))
    sp = cpb.SamplingParams(max_tokens=max_tokens, stop=value_strings(req.stop, "stop"),
                            stop_token_ids=req.stop_token_ids)
    for name in _SHARED:
        if req.HasField(name):
            setattr(sp, name, getattr(req, name))
    for name in _PLAIN:
        setattr(sp, name, getattr(req, name))
    if logprobs is not None:
        sp.logprobs = logprobs
    if config is not None:
        limits.check_sampling(sp, config, logprobs_param)
    validate(sp)
    return sp


def _too_long(prompt_len: int, max_tokens: int, info: ModelInfo) -> str:
    return (f"This model's maximum context length is {info.max_model_len} tokens; the "
            f"prompt has {prompt_len} tokens and {max_tokens} completion tokens were asked for.")


def validate(sp: cpb.SamplingParams) -> None:
    """Check values the way the workers will (runtime SamplingParams), so a bad value
    is a 400 from the gateway, not a failed leg."""
    try:
        from pdmesh.worker.convert import sampling_from_proto
    except ImportError:  # the workers' converter is not installed: workers still check
        return
    try:
        sampling_from_proto(sp)
    except ValueError as e:
        raise invalid(str(e)) from None


class Collected:
    """A non-streaming response's n choices, gathered from the request's Deltas."""

    def __init__(self, sampling: cpb.SamplingParams, text_prefix: str = "") -> None:
        n = choice_count(sampling)
        self.texts = [[text_prefix] for _ in range(n)]  # completions' echo first
        self.logprobs: list[list[cpb.TokenLogprob]] = [[] for _ in range(n)]
        self.finish = [cpb.FINISH_REASON_UNSPECIFIED] * n
        self.usage, self.room = RequestUsage(), 0

    def add(self, d: Delta) -> None:
        self.room = d.room
        self.texts[d.index].append(d.text)
        self.logprobs[d.index].extend(d.logprobs)
        if d.finish_reason:
            self.finish[d.index] = d.finish_reason
        self.usage.add(d)

    def choices(self):
        """(index, text, logprobs as a Delta, OpenAI finish_reason) per choice, in order."""
        for i, (text, lps, fr) in enumerate(zip(self.texts, self.logprobs, self.finish)):
            yield i, "".join(text), Delta(self.room, logprobs=lps), FINISH.get(fr, "stop")


def usage_proto(u: cpb.Usage | None) -> opb.CompletionUsage:
    if u is None:  # no choice ended (never on an OK stream)
        u = cpb.Usage()
    return opb.CompletionUsage(
        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
        prompt_tokens_details=opb.PromptTokensDetails(cached_tokens=u.cached_tokens))


def chat_logprobs(delta: Delta, info: ModelInfo) -> opb.ChatChoiceLogprobs:
    tok = info.tokenizer
    out = opb.ChatChoiceLogprobs()
    for lp in delta.logprobs:
        text = tok.decode([lp.token_id], skip_special_tokens=False)
        entry = out.content.add(token=text, logprob=lp.logprob, bytes=list(text.encode()))
        for top in lp.top_logprobs:
            t = tok.decode([top.token_id], skip_special_tokens=False)
            entry.top_logprobs.add(token=t, logprob=top.logprob, bytes=list(t.encode()))
    return out


def completion_logprobs(delta: Delta, info: ModelInfo, offset: int) -> opb.CompletionLogprobs:
    """Legacy logprobs; `offset` is the character offset of this delta's text."""
    tok = info.tokenizer
    out = opb.CompletionLogprobs()
    for lp in delta.logprobs:
        text = tok.decode([lp.token_id], skip_special_tokens=False)
        out.tokens.append(text)
        out.token_logprobs.append(lp.logprob)
        out.text_offset.append(offset)
        offset += len(text)
        top = out.top_logprobs.add()
        for t in lp.top_logprobs:
            top[tok.decode([t.token_id], skip_special_tokens=False)] = t.logprob
    return out


def header(cls, prefix: str, room: int, info: ModelInfo, obj: str, created: int):
    """An empty response message with the fields every chunk repeats."""
    return cls(id=f"{prefix}{room:x}", object=obj, created=created, model=info.name,
               system_fingerprint="pdmesh")


def now() -> int:
    return int(time.time())


def warm_up(info: ModelInfo, config: Any = None) -> None:
    """Prepare a chat and a completion request and detokenize a token, as a gateway
    process's first request would: the lazy first-use work of these steps (the chat
    template's compilation, the first encode, the sampling check's import, the
    detokenizer's decoder checks) was 45-80 ms of that request on the H200 and ~6 ms on a
    CPU (traces of 2026-12-02). A failure is logged: a request would meet it and say so."""
    chat = opb.ChatCompletionRequest(model=info.name, max_tokens=1)
    chat.messages.add(role="user").content.string_value = "Hello!"
    text = opb.CompletionRequest(model=info.name, max_tokens=1)
    text.prompt.string_value = "Hello, world!"
    for request, prompt in ((chat, lambda: chat_prompt(chat.messages, info)),
                            (text, lambda: completion_prompt(text.prompt, info))):
        try:
            ids = prompt()
            sampling(request, len(ids), info, 1, None, config)
            detokenizer.warm_up(info.tokenizer, ids)
        except Exception as e:  # noqa: BLE001 - e.g. a model without a chat template
            log.warning("gateway warm-up, %s: %s", type(request).__name__, e)
