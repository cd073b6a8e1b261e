"""REST JSON shapes clients depend on (sglang's bench_serving reads choices[0]["text"]),
and the REST stream's fast chunks (services/gateway/chunks.py: orjson over a per-request
template) against the proto chunks gRPC sends, printed by the generic `to_json`."""
from __future__ import annotations

import json

import pytest

from pdmesh.services.gateway.chunks import ProtoChunks, SseChunks
from pdmesh.services.gateway.dispatch import Delta, ModelInfo
from pdmesh.services.gateway.transcoder import to_json
from pdmesh.v1 import common_pb2 as cpb
from pdmesh.v1 import openai_pb2


def test_streamed_completion_chunk_keeps_empty_text():
    msg = openai_pb2.CompletionResponse(id="cmpl-1", object="text_completion")
    msg.choices.add(index=0, text="", finish_reason="length")
    choice = to_json(msg)["choices"][0]
    assert choice == {"index": 0, "text": "", "finish_reason": "length"}


@pytest.fixture(scope="module")
def info():
    from pdmesh.runtime.loader import resolve_model_path
    from pdmesh.runtime.tokenizer import Tokenizer

    return ModelInfo("default", Tokenizer.from_path(resolve_model_path("default")), 2048)


def logprobs(ids, top):
    return [cpb.TokenLogprob(token_id=t, logprob=-0.1234 * (i + 1), top_logprobs=[
        cpb.TopLogprob(token_id=t + k, logprob=-1.0 * k) for k in range(top)])
        for i, t in enumerate(ids)]


def deltas(room=0x1F2E3D4C5B6A7988):
    """A stream: text, an empty delta, a special token, non-ASCII, then the end."""
    usage = cpb.Usage(prompt_tokens=7, completion_tokens=5, total_tokens=12, cached_tokens=3)
    return [Delta(room, [504], " Paris", logprobs([504], 2)),
            Delta(room, [], ""),
            Delta(room, [0, 1], "", logprobs([0, 1], 0)),
            Delta(room, [9000], ' "é\n\u2028😀', logprobs([9000], 1)),
            Delta(room, [13], ".", logprobs([13], 2), cpb.FINISH_REASON_LENGTH, usage)]


@pytest.mark.parametrize("kind,prefix", [("chat", ""), ("completion", ""),
                                         ("completion", "Echo: ")])  # echo: completions only
@pytest.mark.parametrize("lp", [False, True])
@pytest.mark.parametrize("usage", [False, True])
def test_sse_chunks_equal_proto_chunks(info, kind, prefix, lp, usage):
    fast = SseChunks(kind, info, 1795000000, lp, usage, prefix)
    slow = ProtoChunks(kind, info, 1795000000, lp, usage, prefix)
    for d in deltas():
        events = b"".join(fast.out(d))
        assert events.endswith(b"\n\n") and events.startswith(b"data: {")
        got = [json.loads(e[len(b"data: "):]) for e in events.split(b"\n\n") if e]
        assert got == [to_json(m) for m in slow.out(d)]


def test_sse_chunk_shape(info):
    fast = SseChunks("chat", info, 5, False, True)
    first, *_, last = [b"".join(fast.out(d)) for d in deltas(room=255)]
    assert json.loads(first[6:]) == {
        "id": "chatcmpl-ff", "object": "chat.completion.chunk", "created": 5,
        "model": "default", "system_fingerprint": "pdmesh",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": " Paris"}}]}
    end, usage = [json.loads(e[6:]) for e in last.split(b"\n\n") if e]
    assert end["choices"][0]["finish_reason"] == "length" and usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12,
                              "prompt_tokens_details": {"cached_tokens": 3}}
