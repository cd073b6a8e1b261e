"""REST JSON shapes clients depend on (sglang's bench_serving reads choices[0]["text"])."""
from __future__ import annotations

from pdmesh.services.gateway.transcoder import to_json
from pdmesh.v1 import openai_pb2


def test_streamed_completion_chunk_keeps_empty_text():
    msg = openai_pb2.CompletionResponse(id="cmpl-1", object="text_completion")
    msg.choices.add(index=0, text="", finish_reason="length")
    choice = to_json(msg)["choices"][0]
    assert choice == {"index": 0, "text": "", "finish_reason": "length"}
