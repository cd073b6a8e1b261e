"""n > 1 at the gateway without a mesh: per-choice detokenizing and stop strings
(services/gateway/choices.py), the request's usage (prompt once, completions summed), and
the interleaved stream chunks, SSE bytes against the proto chunks gRPC sends."""
from __future__ import annotations

import json

import pytest

from pdmesh.services.gateway.choices import Choices, RequestUsage
from pdmesh.services.gateway.chunks import ProtoChunks, SseChunks
from pdmesh.services.gateway.dispatch import Delta, ModelInfo
from pdmesh.services.gateway import openai_api as oa
from pdmesh.services.gateway.transcoder import to_json
from pdmesh.v1 import common_pb2 as cpb
from pdmesh.v1 import decode_pb2

ROOM = 0xABC


@pytest.fixture(scope="module")
def info():
    from pdmesh.runtime.loader import resolve_model_path
    from pdmesh.runtime.tokenizer import Tokenizer

    return ModelInfo("default", Tokenizer.from_path(resolve_model_path("default")), 2048)


def usage(completion: int, prompt: int = 7, cached: int = 3) -> cpb.Usage:
    return cpb.Usage(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion, cached_tokens=cached)


def chunk(index: int, ids: list[int], finish: int = 0, u: cpb.Usage | None = None):
    return decode_pb2.DecodeChunk(index=index, token_ids=ids, finish_reason=finish, usage=u)


def feed(choices: Choices, chunks) -> list[tuple[Delta, bool | None]]:
    out = []
    for c in chunks:
        d = Delta(ROOM, list(c.token_ids), finish_reason=c.finish_reason, index=c.index)
        out.append((d, choices.take(d, c.usage)))
    return out


def test_a_stop_string_ends_its_choice_only(info):
    tok = info.tokenizer
    a, b = tok.encode(" red apple tree"), tok.encode(" green pear")
    sp = cpb.SamplingParams(n=2, stop=["apple"])
    choices = Choices(tok, tok.encode("Fruit:"), sp)
    got = feed(choices, [chunk(1, b[:1]), chunk(0, a[:2]), chunk(0, a[2:]),
                         chunk(1, b[1:], cpb.FINISH_REASON_LENGTH, usage(len(b)))])
    (d1, s1), (d0, s0), (_, dropped), (end1, s_end) = got
    assert (s1, s0, dropped, s_end) == (False, True, None, False)
    assert d0.index == 0 and d0.text == " red " and d0.finish_reason == cpb.FINISH_REASON_STOP
    assert d0.usage.completion_tokens == 2  # counted here: the worker has not finished it
    assert dropped is None  # the worker's tail of the stopped choice
    assert end1.text == " pear" and end1.usage.completion_tokens == len(b)
    assert choices.done


def test_out_of_range_index_is_dropped(info):
    choices = Choices(info.tokenizer, [1, 2], cpb.SamplingParams(n=2))
    assert feed(choices, [chunk(2, [5])])[0][1] is None and not choices.done


def test_request_usage_counts_the_prompt_once():
    u = RequestUsage()
    assert u.total() is None
    for i, n in ((1, 4), (0, 6), (2, 5)):
        u.add(Delta(ROOM, finish_reason=cpb.FINISH_REASON_LENGTH, usage=usage(n), index=i))
    u.add(Delta(ROOM, [9], "x", index=0))  # not an end: ignored
    assert u.total() == usage(15)


def interleaved(room: int = ROOM) -> list[Delta]:
    """Two choices' deltas, interleaved; choice 1 ends first."""
    lp = lambda t: [cpb.TokenLogprob(token_id=t, logprob=-0.5)]  # noqa: E731
    return [Delta(room, [504], " Paris", lp(504), index=0),
            Delta(room, [13], "Rome", lp(13), index=1),
            Delta(room, [9000], " é", lp(9000), index=0),
            Delta(room, [13], ".", lp(13), cpb.FINISH_REASON_STOP, usage(2), index=1),
            Delta(room, [13], ".", lp(13), cpb.FINISH_REASON_LENGTH, usage(3), index=0)]


@pytest.mark.parametrize("kind,prefix", [("chat", ""), ("completion", "Echo: ")])
@pytest.mark.parametrize("lp", [False, True])
def test_sse_chunks_equal_proto_chunks_for_two_choices(info, kind, prefix, lp):
    fast = SseChunks(kind, info, 1795000000, lp, True, prefix, 2)
    slow = ProtoChunks(kind, info, 1795000000, lp, True, prefix, 2)
    events = []
    for d in interleaved():
        raw = b"".join(fast.out(d))
        got = [json.loads(e[len(b"data: "):]) for e in raw.split(b"\n\n") if e]
        assert got == [to_json(m) for m in slow.out(d)]
        events += got
    assert [e["choices"][0]["index"] for e in events[:5]] == [0, 1, 0, 1, 0]
    firsts = [events[0]["choices"][0], events[1]["choices"][0]]
    if kind == "chat":  # each choice's first chunk has the role
        assert all(c["delta"]["role"] == "assistant" for c in firsts)
        assert "role" not in events[2]["choices"][0]["delta"]
    else:  # echo in front of each choice's first text; offsets per choice
        assert [c["text"] for c in firsts] == ["Echo:  Paris", "Echo: Rome"]
        if lp:
            assert events[2]["choices"][0]["logprobs"]["text_offset"] == [len("Echo:  Paris")]
            assert events[3]["choices"][0]["logprobs"]["text_offset"] == [len("Echo: Rome")]
    ends = [e["choices"][0].get("finish_reason") for e in events[:5]]
    assert ends == [None, None, None, "stop", "length"]
    assert len(events) == 6 and events[5]["choices"] == []  # usage once, after the last end
    assert events[5]["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12,
                                  "prompt_tokens_details": {"cached_tokens": 3}}


def test_collected_response_has_every_choice_in_order():
    got = oa.Collected(cpb.SamplingParams(n=2), "Echo: ")
    for d in interleaved():
        got.add(d)
    rows = [(i, text, fr) for i, text, _, fr in got.choices()]
    assert rows == [(0, "Echo:  Paris é.", "length"), (1, "Echo: Rome.", "stop")]
    assert [len(lps.logprobs) for _, _, lps, _ in got.choices()] == [3, 2]
    assert got.usage.total() == usage(5) and got.room == ROOM
