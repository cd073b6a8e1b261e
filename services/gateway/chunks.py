"""Streamed OpenAI chunks of one request, as proto messages (gRPC) or as SSE bytes (REST).

The REST stream is the gateway's hot path: one chunk per decode message, for every
stream. `SseChunks` builds each event straight from the Delta with orjson: the fields
every chunk repeats (id, object, created, model, system_fingerprint) are encoded once per
request into a byte template, and only the choice is encoded per chunk. It writes the
same JSON as `transcoder.to_json` of the proto chunk `ProtoChunks` builds for gRPC
(tests/test_transcoder_json.py compares the two): same fields, same values.

`kind` is "chat" (chat.completion.chunk: delta.role on the first chunk, delta.content)
or "completion" (text_completion: text, legacy logprobs with text offsets).

n > 1: the choices' chunks interleave, each with its `index`; every choice has its own
first chunk (role, echo), text offsets and finish_reason chunk, and the usage chunk
(include_usage) comes once, after the last choice ended, with the request's usage
(choices.RequestUsage: prompt once, completion tokens summed).
"""
from __future__ import annotations

import orjson
from google.protobuf.internal.type_checkers import ToShortestFloat

from pdmesh.v1 import openai_pb2 as opb
from pdmesh.services.gateway import openai_api as oa
from pdmesh.services.gateway.choices import RequestUsage
from pdmesh.services.gateway.dispatch import Delta, ModelInfo

_KINDS = {"chat": (opb.ChatCompletionResponse, "chatcmpl-", "chat.completion.chunk"),
          "completion": (opb.CompletionResponse, "cmpl-", "text_completion")}


class _Stream:
    """What both encodings share: the request's constants and the stream's position."""

    def __init__(self, kind: str, info: ModelInfo, created: int, logprobs: bool,
                 include_usage: bool, text_prefix: str = "", n: int = 1) -> None:
        self.kind, self.info, self.created = kind, info, created
        self.logprobs, self.include_usage, self.n = logprobs, include_usage, n
        self.started: set[int] = set()  # choices whose first chunk went out
        self.prefix = text_prefix  # completions' echo: sent in front of each first text
        # completions: per choice, character offset (in echo + completion) of the next text
        self.offsets = [len(text_prefix)] * n
        self.usage = RequestUsage()

    def _begin(self, d: Delta) -> bool:
        """True when `d` is its choice's first chunk."""
        first = d.index not in self.started
        self.started.add(d.index)
        return first

    def _text(self, d: Delta, first: bool) -> str:
        return self.prefix + d.text if first else d.text

    def _ends_stream(self, d: Delta) -> bool:
        """`d` ends the last choice still running: the usage chunk follows it."""
        self.usage.add(d)
        return bool(d.finish_reason) and len(self.usage.ended) >= self.n


class ProtoChunks(_Stream):
    """Chunks as pdmesh.v1 response messages (the gRPC stream)."""

    def out(self, d: Delta) -> list:
        """The chunk of `d`, then the usage chunk when `d` ends the stream."""
        cls, prefix, obj = _KINDS[self.kind]
        chunk = oa.header(cls, prefix, d.room, self.info, obj, self.created)
        choice = chunk.choices.add(index=d.index)
        first = self._begin(d)
        text = self._text(d, first)
        if self.kind == "chat":
            if first:
                choice.delta.role = "assistant"
            choice.delta.content.string_value = text
            if self.logprobs:
                choice.logprobs.CopyFrom(oa.chat_logprobs(d, self.info))
        else:
            choice.text = text
            if self.logprobs:
                choice.logprobs.CopyFrom(oa.completion_logprobs(d, self.info,
                                                                self.offsets[d.index]))
            self.offsets[d.index] += len(d.text)
        if d.finish_reason:
            choice.finish_reason = oa.FINISH.get(d.finish_reason, "stop")
        out = [chunk]
        if self._ends_stream(d) and self.include_usage:
            usage = oa.header(cls, prefix, d.room, self.info, obj, self.created)
            usage.usage.CopyFrom(oa.usage_proto(self.usage.total()))
            out.append(usage)
        return out


class SseChunks(_Stream):
    """Chunks as `data: {...}\\n\\n` bytes (the REST stream); one bytes object per Delta,
    the usage event included, so the end of a stream is one write."""

    _head = b""

    def _template(self, room: int) -> None:
        _, prefix, obj = _KINDS[self.kind]
        head = orjson.dumps({"id": f"{prefix}{room:x}", "object": obj,
                             "created": self.created, "model": self.info.name,
                             "system_fingerprint": "pdmesh"})
        self._head = b"data: " + head[:-1] + b',"choices":['

    def out(self, d: Delta) -> list[bytes]:
        return [self.event(d)]

    def event(self, d: Delta) -> bytes:
        if not self._head:
            self._template(d.room)
        choice = self._chat(d) if self.kind == "chat" else self._completion(d)
        if d.finish_reason:
            choice["finish_reason"] = oa.FINISH.get(d.finish_reason, "stop")
        out = self._head + orjson.dumps(choice) + b"]}\n\n"
        if self._ends_stream(d) and self.include_usage:
            out += (self._head + b'],"usage":' + orjson.dumps(usage_json(self.usage.total()))
                    + b"}\n\n")
        return out

    def _chat(self, d: Delta) -> dict:
        first = self._begin(d)
        delta = {"role": "assistant", "content": self._text(d, first)} if first \
            else {"content": self._text(d, first)}
        choice = {"index": d.index, "delta": delta}
        if self.logprobs:
            choice["logprobs"] = {"content": chat_logprobs(d, self.info)}
        return choice

    def _completion(self, d: Delta) -> dict:
        text = self._text(d, self._begin(d))
        choice = {"index": d.index, "text": text}
        if self.logprobs:
            choice["logprobs"] = completion_logprobs(d, self.info, self.offsets[d.index])
        self.offsets[d.index] += len(d.text)
        return choice


def usage_json(u) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def _token(text: str, logprob: float) -> dict:
    entry = {"token": text} if text else {}  # to_json drops empty plain strings
    entry["logprob"] = ToShortestFloat(logprob)  # a float32, printed as json_format does
    entry["bytes"] = list(text.encode())
    return entry


def chat_logprobs(d: Delta, info: ModelInfo) -> list[dict]:
    """`oa.chat_logprobs` as JSON."""
    decode, out = info.tokenizer.decode, []
    for lp in d.logprobs:
        entry = _token(decode([lp.token_id], skip_special_tokens=False), lp.logprob)
        entry["top_logprobs"] = [_token(decode([t.token_id], skip_special_tokens=False),
                                        t.logprob) for t in lp.top_logprobs]
        out.append(entry)
    return out


def completion_logprobs(d: Delta, info: ModelInfo, offset: int) -> dict:
    """`oa.completion_logprobs` as JSON (top_logprobs is a Struct there: doubles as-is)."""
    decode = info.tokenizer.decode
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in d.logprobs:
        text = decode([lp.token_id], skip_special_tokens=False)
        out["tokens"].append(text)
        out["token_logprobs"].append(ToShortestFloat(lp.logprob))
        out["text_offset"].append(offset)
        offset += len(text)
        out["top_logprobs"].append({decode([t.token_id], skip_special_tokens=False): t.logprob
                                    for t in lp.top_logprobs})
    return out
